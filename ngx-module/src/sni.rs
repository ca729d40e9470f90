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
pub(crate) const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
pub(crate) const CLIENT_HELLO: u8 = 1;
/// Largest record payload accepted: 2^14 plus the 2048 bytes RFC 8446 allows for expansion.
pub(crate) const MAX_RECORD: usize = 16384 + 2048;
/// Largest ClientHello message body accepted (real ones, post-quantum key shares included, are
/// a few KiB).
pub(crate) const MAX_HELLO: usize = 16384;
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
#[path = "sni_tests.rs"]
mod tests;
