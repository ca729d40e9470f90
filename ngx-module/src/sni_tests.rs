//! Unit tests of the ClientHello reader: real captures, every prefix, every split, hand-built
//! edge cases and random mutations.

use super::*;

// Captured with Python's `ssl` module: an `SSLObject` over two `MemoryBIO`s, one
// `do_handshake()` (it raises `SSLWantReadError`), then the outgoing BIO read out.
/// 517 bytes from Python's ssl (OpenSSL 3.0.19), TLS 1.2-1.3, server_hostname set.
const TLS13_SNI: &str = concat!(
    "1603010200010001fc03038f0892372906e9f30613e8ebac1c6b9a14b1110e8157e554df5ade770108dc0020",
    "69bcc21e8ac4f41d36b9126ceb08f5189e130d9131b7fb2381049a589399acde0024130213031301c02cc030",
    "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f00000023002100001e6162633132",
    "332e6a7570797465722e6770752e6578616d706c652e636f6d000b000403000102000a00160014001d001700",
    "1e0019001801000101010201030104002300000016000000170000000d002a00280403050306030807080808",
    "09080a080b080408050806040105010601030303010302040205020602002b00050403040303002d00020101",
    "003300260024001d0020c53c579fe649f86e75e3d076b9a384d7aeead1cc3dc52db968c5f35f78ed1b4b0015",
    "00cf000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000000",
);
/// 517 bytes from the same client without server_hostname.
const NO_SNI: &str = concat!(
    "1603010200010001fc03037e57b10a76d40c8c18ab66bbda62480cc34be40f3d6c64b621d797819914afe820",
    "d332b8ff61edc768337b82f3e1edc1c719ba35153020326c586a0ab3b8785c490024130213031301c02cc030",
    "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f000b000403000102000a00160014",
    "001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028040305030603",
    "080708080809080a080b080408050806040105010601030303010302040205020602002b0005040304030300",
    "2d00020101003300260024001d002098bd8f192434d4d01a948bd58732558ed5abb2abf5051fe1d060657b06",
    "4ce328001500f600000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000000",
);
/// 201 bytes from the same client limited to TLS 1.2, server_hostname set.
const TLS12_SNI: &str = concat!(
    "16030100c4010000c003037a41691c547522c44609822908f33aca42e91a48b3b952005be52f759ee8bf0600",
    "001ec02cc030c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff010000790000002300210000",
    "1e6162633132332e6a7570797465722e6770752e6578616d706c652e636f6d000b000403000102000a000c00",
    "0a001d0017001e00190018002300000016000000170000000d002a0028040305030603080708080809080a08",
    "0b080408050806040105010601030303010302040205020602",
);

const CAPTURED_NAME: &[u8] = b"abc123.jupyter.gpu.example.com";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The three captures and what each must give.
fn captures() -> [(Vec<u8>, Hello); 3] {
    [
        (hex(TLS13_SNI), name(CAPTURED_NAME)),
        (hex(NO_SNI), Hello::NoName),
        (hex(TLS12_SNI), name(CAPTURED_NAME)),
    ]
}

fn name(bytes: &[u8]) -> Hello {
    let mut name = NameBuf { bytes: [0; MAX_NAME], len: bytes.len() as u8 };
    name.bytes[..bytes.len()].copy_from_slice(bytes);
    Hello::Name(name)
}

/// The handshake message of a capture, which each capture sends in one record.
fn message(capture: &[u8]) -> &[u8] {
    assert_eq!(usize::from(u16::from_be_bytes([capture[3], capture[4]])), capture.len() - 5);
    &capture[5..]
}

/// `message` sent as handshake records cut at each offset of `cuts`.
fn records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([&message.len()]) {
        out.extend([HANDSHAKE, 3, 1]);
        out.extend(((to - from) as u16).to_be_bytes());
        out.extend(&message[from..to]);
        from = to;
    }
    out
}

fn with_len16(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Extensions to build a ClientHello with: (type, body).
type Extensions<'a> = Option<&'a [(u16, Vec<u8>)]>;

/// A minimal ClientHello record carrying `extensions`, or no extensions block at all.
fn hello(extensions: Extensions<'_>) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    if let Some(extensions) = extensions {
        let mut all = Vec::new();
        for (kind, data) in extensions {
            all.extend(kind.to_be_bytes());
            all.extend(with_len16(data));
        }
        body.extend(with_len16(&all));
    }
    let mut msg = vec![CLIENT_HELLO, 0];
    msg.extend(with_len16(&body));
    records(&msg, &[])
}

/// A server_name extension body listing (name_type, name) entries.
fn sni(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in entries {
        list.push(*kind);
        list.extend(with_len16(name));
    }
    with_len16(&list)
}

/// Offset of the two length bytes `back` bytes before the captured name in `capture`.
fn before_name(capture: &[u8], back: usize) -> usize {
    let at = capture.windows(CAPTURED_NAME.len()).position(|w| w == CAPTURED_NAME);
    at.expect("name in capture") - back
}

fn bump(buf: &[u8], at: usize) -> Vec<u8> {
    let mut out = buf.to_vec();
    let len = u16::from_be_bytes([out[at], out[at + 1]]) + 1;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    out
}

#[test]
fn captures_give_their_name_or_none() {
    for (capture, want) in captures() {
        assert_eq!(client_hello_server_name(&capture), want);
    }
}

#[test]
fn every_proper_prefix_is_incomplete() {
    for (capture, _) in captures() {
        for len in 0..capture.len() {
            assert_eq!(client_hello_server_name(&capture[..len]), Hello::Incomplete, "{len}");
        }
    }
}

#[test]
fn a_hello_split_over_two_records_at_any_byte_gives_the_same_answer() {
    for (capture, want) in captures() {
        let msg = message(&capture);
        for cut in 1..msg.len() {
            assert_eq!(client_hello_server_name(&records(msg, &[cut])), want, "{cut}");
        }
    }
}

#[test]
fn a_hello_in_one_byte_records_gives_the_same_answer_and_its_prefixes_wait() {
    for (capture, want) in captures() {
        let msg = message(&capture);
        let split = records(msg, &(1..msg.len()).collect::<Vec<_>>());
        assert_eq!(client_hello_server_name(&split), want);
        for len in 0..split.len() {
            assert_eq!(client_hello_server_name(&split[..len]), Hello::Incomplete, "{len}");
        }
    }
}

#[test]
fn bytes_after_the_hello_are_not_read() {
    for (mut capture, want) in captures() {
        capture.extend(b"\x14\x03\x03\x00\x01\x01 and then anything");
        assert_eq!(client_hello_server_name(&capture), want);
    }
}

#[test]
fn wrong_types_and_overlong_lengths_are_not_tls() {
    let capture = hex(TLS13_SNI);
    let mut flipped = capture.clone();
    flipped[0] = 23; // application data
    assert_eq!(client_hello_server_name(&flipped), Hello::NotTls);
    let mut flipped = capture.clone();
    flipped[5] = 2; // ServerHello
    assert_eq!(client_hello_server_name(&flipped), Hello::NotTls);
    let mut flipped = capture.clone();
    flipped[1] = 2;
    assert_eq!(client_hello_server_name(&flipped), Hello::NotTls);
    // Before the name: its length, the list length, the extension length.
    for back in [2, 5, 7] {
        let bumped = bump(&capture, before_name(&capture, back));
        assert_eq!(client_hello_server_name(&bumped), Hello::NotTls, "{back}");
    }
    // The extensions' total length, after version, random, session id, suites, compressions.
    let mut at = 5 + 4 + 2 + 32;
    at += 1 + usize::from(capture[at]);
    at += 2 + usize::from(u16::from_be_bytes([capture[at], capture[at + 1]]));
    at += 1 + usize::from(capture[at]);
    assert_eq!(client_hello_server_name(&bump(&capture, at)), Hello::NotTls);
    // A record longer than TLS allows, and an empty one.
    for len in [MAX_RECORD as u16 + 1, 0] {
        let mut bad = capture.clone();
        bad[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(client_hello_server_name(&bad), Hello::NotTls, "{len}");
    }
    // A second record of another type in the middle of the message.
    let mut split = records(message(&capture), &[100]);
    split[5 + 100] = 21;
    assert_eq!(client_hello_server_name(&split), Hello::NotTls);
}

#[test]
fn other_protocols_are_not_tls_from_their_first_byte() {
    let sslv2 = b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10";
    for text in [&b"GET / HTTP/1.1\r\n"[..], b"SSH-2.0-OpenSSH_9.2\r\n", sslv2] {
        assert_eq!(client_hello_server_name(text), Hello::NotTls);
        assert_eq!(client_hello_server_name(&text[..1]), Hello::NotTls);
    }
    assert_eq!(client_hello_server_name(b""), Hello::Incomplete);
}

#[test]
fn built_hellos_follow_the_name_rules() {
    let long = [b'a'; 300];
    let cases: [(Extensions<'_>, Hello); 10] = [
        (None, Hello::NoName),
        (Some(&[]), Hello::NoName),
        (Some(&[(10, vec![0, 2, 0, 29])]), Hello::NoName),
        (Some(&[(0, sni(&[(0, b"a.b")])), (10, vec![0, 2, 0, 29])]), name(b"a.b")),
        (Some(&[(0, sni(&[(0, &long[..255])]))]), name(&long[..255])),
        (Some(&[(0, sni(&[(7, b"x"), (0, b"a.b")]))]), name(b"a.b")),
        (Some(&[(0, sni(&[(7, b"x")]))]), Hello::NoName),
        (Some(&[(0, sni(&[(0, b"")]))]), Hello::NotTls),
        (Some(&[(0, sni(&[(0, &long[..])]))]), Hello::NotTls),
        (Some(&[(0, sni(&[(0, b"a.b"), (0, b"c.d")]))]), Hello::NotTls),
    ];
    for (i, (extensions, want)) in cases.into_iter().enumerate() {
        assert_eq!(client_hello_server_name(&hello(extensions)), want, "case {i}");
    }
    let empty_list = hello(Some(&[(0, vec![0, 0])]));
    assert_eq!(client_hello_server_name(&empty_list), Hello::NotTls);
    let twice = hello(Some(&[(0, sni(&[(0, b"a.b")])), (0, sni(&[(0, b"c.d")]))]));
    assert_eq!(client_hello_server_name(&twice), Hello::NotTls);
}

#[test]
fn random_mutations_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut bases: Vec<Vec<u8>> = captures().into_iter().map(|(c, _)| c).collect();
    bases.push(records(message(&bases[0]), &[3, 60, 150, 400]));
    let mut answers = [0; 4];
    for round in 0..20_000 {
        let mut buf = bases[round % bases.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = next() as usize % buf.len();
            match next() % 4 {
                0 => buf[at] = next() as u8,
                1 => buf[at] ^= 1 << (next() % 8),
                2 => buf[at] = buf[at].wrapping_add(1),
                _ => buf.truncate(at.max(1)),
            }
        }
        let answer = client_hello_server_name(&buf);
        if let Hello::Name(name) = &answer {
            assert!((1..=MAX_NAME).contains(&name.as_bytes().len()));
        }
        answers[match answer {
            Hello::Incomplete => 0,
            Hello::NotTls => 1,
            Hello::NoName => 2,
            Hello::Name(_) => 3,
        }] += 1;
    }
    // The mutations reach every outcome, so the loop exercises more than the first check.
    assert!(answers.iter().all(|&n| n > 0), "{answers:?}");
}

/// Feeds `bytes` to a fresh scan as they would arrive, `step` bytes per wake-up; returns the
/// answer of each wake-up and the scan.
fn dribble(bytes: &[u8], step: usize) -> (Vec<Hello>, crate::hello_scan::HelloScan) {
    let mut scan = crate::hello_scan::HelloScan::default();
    let mut answers = Vec::new();
    let mut len = 0;
    while len < bytes.len() {
        len = (len + step).min(bytes.len());
        answers.push(scan.feed(&bytes[..len]));
    }
    (answers, scan)
}

#[test]
fn a_dribbled_hello_is_read_once_not_once_per_byte() {
    for (capture, want) in captures() {
        let msg = message(&capture);
        let one_byte_records = records(msg, &(1..msg.len()).collect::<Vec<_>>());
        for bytes in [capture.clone(), one_byte_records] {
            let (answers, scan) = dribble(&bytes, 1);
            let (last, waits) = answers.split_last().unwrap();
            assert_eq!(*last, want, "the whole hello gives the stateless answer");
            assert!(waits.iter().all(|a| *a == Hello::Incomplete), "every prefix waits");
            // Parsed a handful of times (doubling, then once whole), not once per byte.
            let bound = (bytes.len() as f64).log2() as u32 + 2;
            assert!(scan.parses() <= bound, "{} full parses for {} wake-ups", scan.parses(), bytes.len());
        }
    }
}

#[test]
fn a_scan_refuses_plain_text_at_once_and_agrees_with_the_stateless_reader() {
    for text in [&b"GET / HTTP/1.1\r\n"[..], b"SSH-2.0-OpenSSH_9.2\r\n", b"\x16\x02", b"\x17\x03\x03\x00\x05"] {
        assert_eq!(dribble(text, 1).0.last(), Some(&Hello::NotTls), "{}", text.escape_ascii());
        assert_eq!(crate::hello_scan::HelloScan::default().feed(&text[..1]) == Hello::NotTls, text[0] != HANDSHAKE);
    }
    // Mutated hellos, fed in pieces: the scan says what the stateless reader says on the same
    // bytes, or waits for more where a defect lies inside a hello that has not come whole.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bases: Vec<Vec<u8>> = captures().into_iter().map(|(c, _)| c).collect();
    for round in 0..3_000 {
        let mut buf = bases[round % bases.len()].clone();
        let at = next() as usize % buf.len();
        buf[at] = next() as u8;
        let (answers, _) = dribble(&buf, 1 + next() as usize % 64);
        let stateless = client_hello_server_name(&buf);
        let last = answers.last().unwrap();
        assert!(
            *last == stateless || (*last == Hello::Incomplete && stateless == Hello::NotTls),
            "round {round}: scan {last:?}, stateless {stateless:?}"
        );
    }
}
