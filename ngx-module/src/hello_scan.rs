//! Reading a ClientHello across wake-ups without reading it again each time.
//!
//! In passthrough, nginx calls the preread handler each time more bytes arrive, with all the
//! bytes so far. Parsing them whole at every call costs quadratic time in a client that sends
//! its hello a byte at a time (measured: about 145 ms of worker CPU for a 16 KiB hello in
//! 1-byte records). [`HelloScan`] keeps, per connection, where it stopped: the record headers
//! already checked, the handshake bytes they carried and the hello's length once its first
//! four bytes came. Each call reads only the new record headers, and runs the full parse of
//! [`crate::sni`] only when the whole hello has arrived, or when the handshake bytes doubled
//! since the last parse (so garbage inside a hello is refused within twice its offset, and
//! the parses of one connection add up to a few times its length).
//!
//! Its answers are those of [`client_hello_server_name`] on the same bytes, except that a
//! defect inside a hello that has not arrived whole may be reported later ([`Hello::Incomplete`]
//! until then). Record headers and the message type are still checked on arrival, so plain
//! text is refused on its first byte.

use crate::sni::{client_hello_server_name, Hello, CLIENT_HELLO, HANDSHAKE, MAX_HELLO, MAX_RECORD};

/// Smallest handshake size at which an unfinished hello is parsed for defects.
const FIRST_CHECK: usize = 64;

/// Where the reading of one connection's ClientHello stands.
#[derive(Clone, Copy, Debug, Default)]
pub struct HelloScan {
    /// Offset of the first record header not yet read with its whole payload.
    next_record: usize,
    /// Handshake bytes carried by the records read whole.
    done: usize,
    /// The handshake message's first four bytes (type and length) and how many came.
    head: [u8; 4],
    head_len: usize,
    /// Handshake bytes that had arrived at the last full parse.
    parsed_at: usize,
    /// Full parses so far.
    parses: u32,
}

impl HelloScan {
    /// Reads what is new in `sent` (everything the client has sent so far: the bytes of the
    /// last call and more).
    #[must_use]
    pub fn feed(&mut self, sent: &[u8]) -> Hello {
        let mut partial = 0;
        while self.need().is_none_or(|need| self.done < need) {
            let header = sent.get(self.next_record..).unwrap_or_default();
            match header.first() {
                None => break,
                Some(&HANDSHAKE) => {}
                Some(_) => return Hello::NotTls,
            }
            match header.get(1) {
                None => break,
                Some(3) => {}
                Some(_) => return Hello::NotTls,
            }
            let (Some(&hi), Some(&lo)) = (header.get(3), header.get(4)) else { break };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len == 0 || len > MAX_RECORD {
                return Hello::NotTls;
            }
            let payload = header.get(5..).unwrap_or_default();
            let arrived = payload.len().min(len);
            self.take_head(payload.get(..arrived).unwrap_or_default());
            if arrived < len {
                partial = arrived;
                break;
            }
            self.done += len;
            self.next_record += 5 + len;
        }
        if self.head_len > 0 && self.head[0] != CLIENT_HELLO {
            return Hello::NotTls;
        }
        let arrived = self.done + partial;
        match self.need() {
            Some(need) if need - 4 > MAX_HELLO => return Hello::NotTls,
            Some(need) if arrived >= need => return self.parse(sent, arrived),
            _ => {}
        }
        if arrived >= 2 * self.parsed_at.max(FIRST_CHECK / 2) {
            return self.parse(sent, arrived);
        }
        Hello::Incomplete
    }

    /// Full parses run so far (the cost a connection made).
    #[cfg(test)]
    pub fn parses(&self) -> u32 {
        self.parses
    }

    /// Copies the message's first four bytes from a payload that starts at handshake offset
    /// `done` (the same bytes may be offered again while their record is unfinished).
    fn take_head(&mut self, payload: &[u8]) {
        for (i, &b) in payload.iter().enumerate().take(4) {
            let at = self.done + i;
            if at < 4 && at >= self.head_len {
                self.head[at] = b;
                self.head_len = at + 1;
            }
        }
    }

    /// Handshake bytes of the whole message (header included), once its length came.
    fn need(&self) -> Option<usize> {
        (self.head_len == 4)
            .then(|| 4 + (usize::from(self.head[1]) << 16 | usize::from(self.head[2]) << 8 | usize::from(self.head[3])))
    }

    fn parse(&mut self, sent: &[u8], arrived: usize) -> Hello {
        self.parses += 1;
        self.parsed_at = arrived;
        client_hello_server_name(sent)
    }
}
