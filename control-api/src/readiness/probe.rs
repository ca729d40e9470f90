//! One probe of one service: connect to its published address and check that what answers is
//! the service, not only an open port. (Docker's port proxy accepts every connection as soon as
//! the container runs and closes it when nothing listens inside, so "connected" proves nothing.)
//!
//! - **SSH**: the server speaks first; ready when a line starting `SSH-2.0-` (or `SSH-1.99-`,
//!   a server that also speaks version 1) arrives. RFC 4253 lets other lines come before it.
//! - **Jupyter, code editor**: an HTTP/1.0 `GET /`; ready on any status line (a redirect to
//!   the login page is a working server).
//! - **RDP**: an X.224 Connection Request carrying an RDP negotiation request (TLS and
//!   CredSSP); ready when a TPKT-framed X.224 Connection Confirm comes back, whether it
//!   accepts the protocols or answers with a negotiation failure: either is an RDP server.

use std::net::SocketAddr;
use std::time::Duration;

use gpugate_routes::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a probe reads before it gives up on finding the answer it looks for.
const MAX_READ: usize = 8192;

/// Why a probe failed, in words for the API (no addresses, no driver text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Nothing accepted the connection.
    Refused,
    /// Accepted, then closed before the service said anything.
    ClosedWithoutAnswer,
    /// No (complete) answer within the probe's time limit.
    Timeout,
    /// Something answered, but not as this service.
    WrongAnswer(String),
    /// Another connection error.
    Io(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::ClosedWithoutAnswer => f.write_str("connection closed without an answer"),
            Failure::Timeout => f.write_str("no answer in time"),
            Failure::WrongAnswer(what) => write!(f, "answered, but {what}"),
            Failure::Io(e) => write!(f, "connection failed: {e}"),
        }
    }
}

/// What a service's first bytes say, so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ready,
    NeedMore,
    Wrong(String),
}

/// The request a probe sends first (SSH: none, the server speaks first).
fn request(service: Service) -> &'static [u8] {
    match service {
        Service::Ssh => b"",
        Service::Jupyter | Service::Code | Service::Other => {
            b"GET / HTTP/1.0\r\nHost: localhost\r\nUser-Agent: gpugate-readiness\r\n\r\n"
        }
        // TPKT (version 3, length 19) + X.224 Connection Request (length indicator 14, CR
        // code 0xE0, references and class 0) + RDP_NEG_REQ (type 1, flags 0, length 8,
        // requested protocols TLS | CredSSP).
        Service::Rdp => &[
            0x03, 0x00, 0x00, 0x13, 0x0e, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00,
            0x00,
        ],
    }
}

fn printable(bytes: &[u8]) -> String {
    let s: String = bytes.iter().take(40).map(|b| if b.is_ascii_graphic() || *b == b' ' { *b as char } else { '.' }).collect();
    format!("\"{s}\"")
}

/// SSH: a version line `SSH-2.0-…` or `SSH-1.99-…`, possibly after other lines.
fn ssh(buf: &[u8]) -> Verdict {
    let mut rest = buf;
    loop {
        let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
            // An incomplete line that already shows the version is enough.
            return if rest.starts_with(b"SSH-2.0-") || rest.starts_with(b"SSH-1.99-") {
                Verdict::Ready
            } else if rest.starts_with(b"SSH-") && rest.len() >= 9 {
                Verdict::Wrong(format!("with an unsupported SSH version {}", printable(rest)))
            } else {
                Verdict::NeedMore
            };
        };
        let line = &rest[..nl];
        if line.starts_with(b"SSH-2.0-") || line.starts_with(b"SSH-1.99-") {
            return Verdict::Ready;
        }
        if line.starts_with(b"SSH-") {
            return Verdict::Wrong(format!("with an unsupported SSH version {}", printable(line)));
        }
        if line.starts_with(b"HTTP/") {
            return Verdict::Wrong(format!("not as SSH: {}", printable(line)));
        }
        rest = &rest[nl + 1..];
    }
}

/// HTTP: a status line `HTTP/1.x NNN`.
fn http(buf: &[u8]) -> Verdict {
    if buf.len() < 12 {
        return if b"HTTP/1.".starts_with(&buf[..buf.len().min(7)]) { Verdict::NeedMore } else { Verdict::Wrong(format!("not as HTTP: {}", printable(buf))) };
    }
    let status_ok = buf.starts_with(b"HTTP/1.") && buf[8] == b' ' && buf[9..12].iter().all(u8::is_ascii_digit);
    if status_ok {
        Verdict::Ready
    } else {
        Verdict::Wrong(format!("not as HTTP: {}", printable(buf)))
    }
}

/// RDP: TPKT version 3 carrying an X.224 Connection Confirm (code 0xD0).
fn rdp(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf[0] != 0x03 {
        return Verdict::Wrong(format!("not as RDP: {}", printable(buf)));
    }
    if buf.len() < 6 {
        return Verdict::NeedMore;
    }
    if buf[1] == 0x00 && buf[5] & 0xf0 == 0xd0 {
        Verdict::Ready
    } else {
        Verdict::Wrong("not with an X.224 connection confirm".into())
    }
}

fn judge(service: Service, buf: &[u8]) -> Verdict {
    match service {
        Service::Ssh => ssh(buf),
        Service::Jupyter | Service::Code | Service::Other => http(buf),
        Service::Rdp => rdp(buf),
    }
}

/// Probes `service` at `addr` once, within `timeout`.
pub async fn probe(service: Service, addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, exchange(service, addr)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout),
    }
}

async fn exchange(service: Service, addr: SocketAddr) -> Result<(), Failure> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof => {
            Failure::ClosedWithoutAnswer
        }
        k => Failure::Io(k.to_string()),
    };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    let req = request(service);
    if !req.is_empty() {
        s.write_all(req).await.map_err(io)?;
    }
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                Failure::ClosedWithoutAnswer
            } else {
                Failure::WrongAnswer(format!("incompletely: {}", printable(&buf)))
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match judge(service, &buf) {
            Verdict::Ready => return Ok(()),
            Verdict::Wrong(why) => return Err(Failure::WrongAnswer(why)),
            Verdict::NeedMore if buf.len() >= MAX_READ => {
                return Err(Failure::WrongAnswer(format!("without a recognisable answer in {MAX_READ} bytes")))
            }
            Verdict::NeedMore => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_banners() {
        assert_eq!(ssh(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"), Verdict::Ready);
        assert_eq!(ssh(b"SSH-2.0-dropbear"), Verdict::Ready);
        assert_eq!(ssh(b"SSH-1.99-old\r\n"), Verdict::Ready);
        // Lines before the version are allowed (RFC 4253 4.2).
        assert_eq!(ssh(b"welcome\r\nSSH-2.0-x\r\n"), Verdict::Ready);
        assert_eq!(ssh(b"welcome\r\n"), Verdict::NeedMore);
        assert_eq!(ssh(b"SSH-2"), Verdict::NeedMore);
        assert!(matches!(ssh(b"SSH-1.5-ancient\r\n"), Verdict::Wrong(_)));
        assert!(matches!(ssh(b"HTTP/1.1 400 Bad Request\r\n"), Verdict::Wrong(_)));
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(http(b"HTTP/1.1 302 Found\r\nLocation: /lab\r\n"), Verdict::Ready);
        assert_eq!(http(b"HTTP/1.0 500 Internal"), Verdict::Ready);
        assert_eq!(http(b"HTTP/1."), Verdict::NeedMore);
        assert_eq!(http(b"HT"), Verdict::NeedMore);
        assert!(matches!(http(b"SSH-2.0-OpenSSH\r\n"), Verdict::Wrong(_)));
        assert!(matches!(http(b"HTTP/1.1 abc xyz\r\n"), Verdict::Wrong(_)));
    }

    #[test]
    fn rdp_connection_confirm() {
        // TPKT + X.224 CC + RDP_NEG_RSP (TLS chosen).
        let cc = [0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0, 0, 0x12, 0x34, 0, 0x02, 0x00, 0x08, 0, 0x01, 0, 0, 0];
        assert_eq!(rdp(&cc), Verdict::Ready);
        assert_eq!(rdp(&cc[..4]), Verdict::NeedMore);
        // A disconnect request (0x80) is not a confirm.
        let dr = [0x03, 0x00, 0x00, 0x0b, 0x06, 0x80, 0, 0, 0, 0, 0];
        assert!(matches!(rdp(&dr), Verdict::Wrong(_)));
        assert!(matches!(rdp(b"SSH-2.0-x"), Verdict::Wrong(_)));
        // Our request is well formed: its TPKT length is its length.
        let req = request(Service::Rdp);
        assert_eq!(usize::from(req[2]) << 8 | usize::from(req[3]), req.len());
        assert_eq!(usize::from(req[4]) + 5, req.len());
    }

    #[tokio::test]
    async fn a_port_that_accepts_and_closes_is_not_ready() {
        // What Docker's port proxy does while nothing listens inside the container.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        for svc in [Service::Ssh, Service::Jupyter, Service::Rdp] {
            let r = probe(svc, addr, Duration::from_secs(2)).await;
            assert!(matches!(r, Err(Failure::ClosedWithoutAnswer)), "{svc:?}: {r:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_port_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut open = vec![];
            while let Ok((s, _)) = l.accept().await {
                open.push(s);
            }
        });
        let r = probe(Service::Ssh, addr, Duration::from_millis(300)).await;
        assert_eq!(r, Err(Failure::Timeout));
        held.abort();
    }
}
