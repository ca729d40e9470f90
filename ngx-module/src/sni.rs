//! Reads the TLS server name (SNI) from the first bytes of a connection, without terminating TLS.
//!
//! In TLS passthrough the module must route on the name before any byte reaches the upstream.
//! nginx's `ssl_preread` cannot supply it: nginx runs a phase's handlers in the reverse order
//! of their registration, so the preread handler of a dynamically loaded module runs before
//! `ssl_preread`'s and finds `$ssl_preread_server_name` still empty. This file therefore parses
//! the ClientHello itself, in plain Rust with nothing but `std`, so unit tests reach every
//! branch.
//!
//! The caller passes everything the client has sent so far, each time more arrives, and gets a
//! [`Hello`]. [`Hello::Incomplete`] means "read more"; the caller bounds how much by its buffer
//! (the largest ClientHello accepted here, 16 KiB, arrives in 16 KiB + 4 bytes plus a 5-byte
//! header per record).
//!
//! What is read: handshake records (type 22, version 3.x, 1 to 16384 + 2048 bytes of payload);
//! their payloads, in order, carry one ClientHello handshake message (type 1, at most 16 KiB),
//! which may be split over any number of records at any byte. Every length is checked against
//! the one that encloses it *before* the bytes it announces are awaited: a length that overruns
//! its enclosing structure is [`Hello::NotTls`] as soon as it has arrived, while one that fits
//! but whose bytes have not arrived yet is [`Hello::Incomplete`]. The whole message is read and
//! checked before a name (or its absence) is reported, so a prefix of a valid hello is always
//! `Incomplete`, never an answer that later bytes could contradict.
//!
//! Because a name may straddle two records, [`Hello::Name`] holds a copy in a [`NameBuf`] (255
//! bytes on the stack) rather than a slice of the caller's buffer. Nothing is allocated, and no
//! input can panic: every read goes through `get`, and no arithmetic can overflow.

use std::fmt;

/// Record content type of a handshake record.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Largest record payload accepted: 2^14 plus the 2048 bytes RFC 8446 allows for expansion.
const MAX_RECORD: usize = 16384 + 2048;
/// Largest ClientHello message body accepted (real ones, post-quantum key shares included, are
/// a few KiB).
const MAX_HELLO: usize = 16384;
/// Extension type of server_name (RFC 6066).
const SERVER_NAME: usize = 0;
/// name_type of a DNS host name in the server_name list.
const HOST_NAME: u8 = 0;
/// Longest host name the server_name extension may carry (RFC 6066: `HostName<1..2^16-1>`, but
/// a DNS name is at most 255 bytes).
pub const MAX_NAME: usize = 255;

/// What the first bytes of a connection say about its TLS server name.
// `Name` is 256 bytes and the rest are empty: the value is returned once per call and kept on
// the stack, where a box would be an allocation per call for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to decide: read more (the caller bounds how much, by its buffer).
    Incomplete,
    /// Not a TLS ClientHello (wrong record type, wrong handshake type, bad lengths, SSLv2,
    /// garbage).
    NotTls,
    /// A complete, well-formed ClientHello without a server_name extension (or with no
    /// host_name entry).
    NoName,
    /// The host_name from the server_name extension, exactly as sent (bytes, not yet validated
    /// or lowercased); 1 to [`MAX_NAME`] bytes.
    Name(NameBuf),
}

/// A host name copied out of a ClientHello: 1 to [`MAX_NAME`] bytes, not validated.
#[derive(Clone)]
pub struct NameBuf {
    bytes: [u8; MAX_NAME],
    len: u8,
}

impl NameBuf {
    /// The name as sent.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl PartialEq for NameBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for NameBuf {}

impl fmt::Debug for NameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NameBuf(\"{}\")", self.as_bytes().escape_ascii())
    }
}

/// Parses the start of a client's byte stream.
#[must_use]
pub fn client_hello_server_name(buf: &[u8]) -> Hello {
    match parse(buf) {
        Ok(Some(name)) => Hello::Name(name),
        Ok(None) => Hello::NoName,
        Err(Stop::Incomplete) => Hello::Incomplete,
        Err(Stop::NotTls) => Hello::NotTls,
    }
}

/// Why parsing stopped before the end of the ClientHello.
enum Stop {
    /// The bytes needed next have not arrived.
    Incomplete,
    /// The bytes that have arrived are not a ClientHello.
    NotTls,
}

type Step<T> = Result<T, Stop>;

/// Walks the ClientHello: `Some(name)` for the first host_name, `None` if there is none.
fn parse(buf: &[u8]) -> Step<Option<NameBuf>> {
    let mut r = Reader { buf, at: 0, in_record: 0, off: 0 };
    if r.u8()? != CLIENT_HELLO {
        return Err(Stop::NotTls);
    }
    let len = r.u24()?;
    if len > MAX_HELLO {
        return Err(Stop::NotTls);
    }
    let end = r.off + len;
    // legacy_version (3.x), random, session_id.
    r.fits(2 + 32 + 1, end)?;
    if r.u8()? != 3 {
        return Err(Stop::NotTls);
    }
    r.skip(1 + 32)?;
    let session_id = usize::from(r.u8()?);
    if session_id > 32 {
        return Err(Stop::NotTls);
    }
    r.vector(session_id, end)?;
    r.fits(2, end)?;
    let suites = r.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err(Stop::NotTls);
    }
    r.vector(suites, end)?;
    r.fits(1, end)?;
    let compressions = usize::from(r.u8()?);
    if compressions == 0 {
        return Err(Stop::NotTls);
    }
    r.vector(compressions, end)?;
    if r.off == end {
        // A ClientHello without extensions (allowed before TLS 1.3).
        return Ok(None);
    }
    r.fits(2, end)?;
    let extensions = r.u16()?;
    if r.off + extensions != end {
        return Err(Stop::NotTls);
    }
    let mut server_name = None;
    while r.off < end {
        r.fits(4, end)?;
        let kind = r.u16()?;
        let len = r.u16()?;
        r.fits(len, end)?;
        if kind != SERVER_NAME {
            r.skip(len)?;
        } else if server_name.is_some() {
            // RFC 8446 4.2: at most one extension of each type.
            return Err(Stop::NotTls);
        } else {
            let end = r.off + len;
            server_name = Some(host_name(&mut r, end)?);
        }
    }
    Ok(server_name.flatten())
}

/// Reads a server_name extension body that ends at `end`: the first host_name, if any.
fn host_name(r: &mut Reader<'_>, end: usize) -> Step<Option<NameBuf>> {
    r.fits(2, end)?;
    let list = r.u16()?;
    // RFC 6066: `ServerName server_name_list<1..2^16-1>`, and it fills the extension.
    if list == 0 || r.off + list != end {
        return Err(Stop::NotTls);
    }
    let mut found = None;
    while r.off < end {
        r.fits(3, end)?;
        let kind = r.u8()?;
        let len = r.u16()?;
        r.fits(len, end)?;
        if kind != HOST_NAME {
            r.skip(len)?;
            continue;
        }
        // RFC 6066 3: no more than one name of a type; two would leave the route ambiguous.
        if found.is_some() || len == 0 || len > MAX_NAME {
            return Err(Stop::NotTls);
        }
        let mut name = NameBuf { bytes: [0; MAX_NAME], len: 0 };
        r.copy(name.bytes.get_mut(..len).unwrap_or_default())?;
        name.len = u8::try_from(len).map_err(|_| Stop::NotTls)?;
        found = Some(name);
    }
    Ok(found)
}

/// A cursor over the handshake bytes carried by consecutive handshake records of `buf`.
struct Reader<'a> {
    buf: &'a [u8],
    /// Offset in `buf` of the next unread byte.
    at: usize,
    /// Payload bytes of the current record not read yet (0: the next byte is a record header).
    in_record: usize,
    /// Handshake bytes read so far, across records: the position that lengths are checked at.
    off: usize,
}

impl<'a> Reader<'a> {
    /// Reads the header of the next record, each byte checked as soon as it has arrived, so
    /// that plain text (HTTP, an SSH banner) is refused on its first byte.
    fn next_record(&mut self) -> Step<()> {
        let header = self.buf.get(self.at..).unwrap_or_default();
        match header.first() {
            None => return Err(Stop::Incomplete),
            Some(&HANDSHAKE) => {}
            // Any other record type, SSLv2's two-byte header (high bit set), or not TLS at all.
            // RFC 8446 5.1 forbids interleaving other records inside a handshake message.
            Some(_) => return Err(Stop::NotTls),
        }
        match header.get(1) {
            None => return Err(Stop::Incomplete),
            Some(3) => {}
            Some(_) => return Err(Stop::NotTls),
        }
        let (Some(&hi), Some(&lo)) = (header.get(3), header.get(4)) else {
            return Err(Stop::Incomplete);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        // RFC 8446 5.1: handshake records are never empty.
        if len == 0 || len > MAX_RECORD {
            return Err(Stop::NotTls);
        }
        self.at += 5;
        self.in_record = len;
        Ok(())
    }

    /// The next 1 to `max` (> 0) handshake bytes that lie together in one record.
    fn chunk(&mut self, max: usize) -> Step<&'a [u8]> {
        if self.in_record == 0 {
            self.next_record()?;
        }
        let arrived = self.buf.len().saturating_sub(self.at);
        let n = max.min(self.in_record).min(arrived);
        let bytes = self.buf.get(self.at..self.at + n).unwrap_or_default();
        if bytes.is_empty() {
            return Err(Stop::Incomplete);
        }
        self.at += n;
        self.in_record -= n;
        self.off += n;
        Ok(bytes)
    }

    /// Fails with `NotTls` unless `n` more bytes fit before `end`, the end of the structure
    /// being read.
    fn fits(&self, n: usize, end: usize) -> Step<()> {
        if self.off.saturating_add(n) > end {
            return Err(Stop::NotTls);
        }
        Ok(())
    }

    /// Skips a vector body of `len` bytes that must fit before `end`.
    fn vector(&mut self, len: usize, end: usize) -> Step<()> {
        self.fits(len, end)?;
        self.skip(len)
    }

    fn skip(&mut self, mut n: usize) -> Step<()> {
        while n > 0 {
            n -= self.chunk(n)?.len();
        }
        Ok(())
    }

    fn copy(&mut self, out: &mut [u8]) -> Step<()> {
        let mut done = 0;
        while let Some(rest) = out.get_mut(done..).filter(|rest| !rest.is_empty()) {
            let bytes = self.chunk(rest.len())?;
            // `chunk` returned at most `rest.len()` bytes, so `dst` is exactly as long.
            if let Some(dst) = rest.get_mut(..bytes.len()) {
                dst.copy_from_slice(bytes);
            }
            done += bytes.len();
        }
        Ok(())
    }

    fn u8(&mut self) -> Step<u8> {
        self.chunk(1)?.first().copied().ok_or(Stop::Incomplete)
    }

    fn u16(&mut self) -> Step<usize> {
        Ok(usize::from(self.u8()?) << 8 | usize::from(self.u8()?))
    }

    fn u24(&mut self) -> Step<usize> {
        Ok(usize::from(self.u8()?) << 16 | self.u16()?)
    }
}

#[cfg(test)]
mod tests {
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
}
