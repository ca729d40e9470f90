//! What a route is, in plain Rust: upstream address, environment id, service, generation, expiry.
//! Encoding to and from the slot's words lives here too, so both sides agree byte for byte.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::error::Error;

/// The kind of endpoint a port serves. Stored as one byte in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Other = 0,
    Ssh = 1,
    Jupyter = 2,
    Code = 3,
    Rdp = 4,
}

impl Service {
    /// Every service, in code order.
    pub const ALL: [Service; 5] =
        [Service::Other, Service::Ssh, Service::Jupyter, Service::Code, Service::Rdp];

    /// The lowercase name used in configuration, logs and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Other => "other",
            Service::Ssh => "ssh",
            Service::Jupyter => "jupyter",
            Service::Code => "code",
            Service::Rdp => "rdp",
        }
    }

    /// The service with this code; unknown codes read as `Other`.
    pub const fn from_code(code: u8) -> Service {
        match code {
            1 => Service::Ssh,
            2 => Service::Jupyter,
            3 => Service::Code,
            4 => Service::Rdp,
            _ => Service::Other,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Service::ALL.into_iter().find(|svc| svc.as_str() == s).ok_or_else(|| {
            Error::InvalidRoute(format!(
                "unknown service \"{s}\" (expected ssh, jupyter, code, rdp or other)"
            ))
        })
    }
}

/// An environment id: 1 to 16 bytes of `[a-z0-9_-]`, stored zero-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct EnvId([u8; 16]);

impl EnvId {
    /// Longest id the slot holds.
    pub const MAX_LEN: usize = 16;

    /// The id as text (empty for a route without an environment).
    pub fn as_str(&self) -> &str {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(Self::MAX_LEN);
        // Only ASCII is ever stored through `from_str`; bytes read from a corrupt slot that
        // are not UTF-8 show as an empty id rather than failing the read.
        std::str::from_utf8(&self.0[..len]).unwrap_or("")
    }

    /// The raw, zero-padded bytes.
    pub const fn bytes(&self) -> [u8; 16] {
        self.0
    }

    pub(crate) fn from_words(words: [u64; 2]) -> EnvId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&words[0].to_le_bytes());
        b[8..].copy_from_slice(&words[1].to_le_bytes());
        EnvId(b)
    }

    pub(crate) fn to_words(self) -> [u64; 2] {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&self.0[..8]);
        hi.copy_from_slice(&self.0[8..]);
        [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
    }
}

impl FromStr for EnvId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() > Self::MAX_LEN {
            return Err(Error::InvalidRoute(format!(
                "environment id \"{s}\" is {} characters, at most {} allowed",
                s.len(),
                Self::MAX_LEN
            )));
        }
        if let Some(c) =
            s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(Error::InvalidRoute(format!(
                "environment id \"{s}\" contains {c:?}; only a-z, 0-9, '-' and '_' are allowed"
            )));
        }
        let mut b = [0u8; 16];
        b[..s.len()].copy_from_slice(s.as_bytes());
        Ok(EnvId(b))
    }
}

impl fmt::Display for EnvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for EnvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvId({:?})", self.as_str())
    }
}

/// One route: where connections to a port go, and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The workspace's published address (IPv4 or IPv6).
    pub upstream: SocketAddr,
    /// The environment this port belongs to.
    pub env_id: EnvId,
    /// The endpoint kind.
    pub service: Service,
    /// The control plane's generation for this route; tells routes of one port apart.
    pub generation: u64,
    /// Expiry in unix milliseconds; `None` = never.
    pub expires_ms: Option<u64>,
}

impl Route {
    /// A route to `upstream` with no environment, service `other`, generation 0, no expiry.
    pub fn to(upstream: SocketAddr) -> Route {
        Route {
            upstream,
            env_id: EnvId::default(),
            service: Service::Other,
            generation: 0,
            expires_ms: None,
        }
    }

    /// Whether the route has expired at `now_ms` (unix milliseconds).
    pub fn expired_at(&self, now_ms: u64) -> bool {
        matches!(self.expires_ms, Some(t) if now_ms >= t)
    }

    /// Checks that the route can be stored: the upstream port must not be 0, an IPv6
    /// upstream must have no scope id (the slot has no room for one, and dropping it would
    /// route elsewhere), and an expiry must be a real time (0 would read as "never").
    pub fn validate(&self) -> Result<(), Error> {
        if self.upstream.port() == 0 {
            return Err(Error::InvalidRoute(format!(
                "upstream \"{}\" has port 0",
                self.upstream
            )));
        }
        check_scope(&self.upstream)?;
        if self.expires_ms == Some(0) {
            return Err(Error::InvalidRoute(
                "expiry 0 is not a time; leave the expiry out for a route that never expires"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The words of a slot, as copied out under the seqlock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawRoute {
    pub meta: u32,
    pub upstream_port: u32,
    pub addr: [u32; 4],
    pub env_id: [u64; 2],
    pub generation: u64,
    pub expires_ms: u64,
    pub owner: u64,
}

impl RawRoute {
    /// The words of an empty (not live) slot.
    pub const EMPTY: RawRoute = RawRoute {
        meta: 0,
        upstream_port: 0,
        addr: [0; 4],
        env_id: [0; 2],
        generation: 0,
        expires_ms: 0,
        owner: 0,
    };

    /// The words of `route`, owned by the writer's stamp `owner`.
    pub fn encode(route: &Route, owner: u64) -> RawRoute {
        let mut addr = [0u32; 4];
        let family = match route.upstream.ip() {
            IpAddr::V4(ip) => {
                addr[0] = u32::from_ne_bytes(ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                let o = ip.octets();
                for (i, w) in addr.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                6
            }
        };
        RawRoute {
            meta: crate::layout::pack_meta(true, route.service as u8, family),
            upstream_port: u32::from(route.upstream.port()),
            addr,
            env_id: route.env_id.to_words(),
            generation: route.generation,
            expires_ms: route.expires_ms.unwrap_or(0),
            owner,
        }
    }

    /// Decodes a live slot; `None` for an empty slot or one whose words make no route
    /// (unknown family, port 0): a reader treats both as "no route" and fails closed.
    pub fn decode(&self) -> Option<Route> {
        let (live, service, family) = crate::layout::unpack_meta(self.meta);
        if !live {
            return None;
        }
        let port = u16::try_from(self.upstream_port).ok().filter(|p| *p != 0)?;
        let ip = match family {
            4 => IpAddr::V4(Ipv4Addr::from(self.addr[0].to_ne_bytes())),
            6 => {
                let mut o = [0u8; 16];
                for (i, w) in self.addr.iter().enumerate() {
                    o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return None,
        };
        Some(Route {
            upstream: SocketAddr::new(ip, port),
            env_id: EnvId::from_words(self.env_id),
            service: Service::from_code(service),
            generation: self.generation,
            expires_ms: (self.expires_ms != 0).then_some(self.expires_ms),
        })
    }
}

/// Parses `HOST:PORT` with an IP host (`10.0.0.5:22`, `[::1]:22`), with a readable error.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, Error> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        Error::InvalidRoute(format!(
            "upstream \"{s}\" is not an IP address and port (expected 10.0.0.5:22 or [::1]:22)"
        ))
    })?;
    if addr.port() == 0 {
        return Err(Error::InvalidRoute(format!("upstream \"{s}\" has port 0")));
    }
    check_scope(&addr)?;
    Ok(addr)
}

fn check_scope(addr: &SocketAddr) -> Result<(), Error> {
    match addr {
        SocketAddr::V6(a) if a.scope_id() != 0 => Err(Error::InvalidRoute(format!(
            "upstream \"{addr}\" has an IPv6 scope id; link-local upstreams are not supported, \
             use a global or loopback address"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(up: &str) -> Route {
        Route {
            upstream: up.parse().unwrap(),
            env_id: "6hiflzwte2xnkroq".parse().unwrap(),
            service: Service::Jupyter,
            generation: 42,
            expires_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn encode_decode_round_trips_v4_and_v6() {
        for up in ["10.1.2.3:22", "[::1]:8888", "[2001:db8::7:1]:65535", "127.0.0.1:1"] {
            let r = route(up);
            assert_eq!(RawRoute::encode(&r, 9).decode(), Some(r), "{up}");
            assert_eq!(RawRoute::encode(&r, 9).owner, 9);
        }
    }

    #[test]
    fn empty_and_malformed_slots_decode_to_none() {
        assert_eq!(RawRoute::EMPTY.decode(), None);
        let mut raw = RawRoute::encode(&route("10.0.0.1:22"), 1);
        raw.meta = crate::layout::pack_meta(true, 1, 5);
        assert_eq!(raw.decode(), None, "unknown family");
        let mut raw = RawRoute::encode(&route("10.0.0.1:22"), 1);
        raw.upstream_port = 0;
        assert_eq!(raw.decode(), None, "port 0");
        raw.upstream_port = 70000;
        assert_eq!(raw.decode(), None, "port beyond 65535");
    }

    #[test]
    fn env_id_rules() {
        assert_eq!("abc".parse::<EnvId>().unwrap().as_str(), "abc");
        assert_eq!("6hiflzwte2xnkroq".parse::<EnvId>().unwrap().as_str(), "6hiflzwte2xnkroq");
        assert!("6hiflzwte2xnkroqx".parse::<EnvId>().is_err());
        let err = "Abc".parse::<EnvId>().unwrap_err().to_string();
        assert!(err.contains("'A'"), "{err}");
        assert_eq!(EnvId::default().as_str(), "");
    }

    #[test]
    fn services_parse_and_print() {
        for s in Service::ALL {
            assert_eq!(s.as_str().parse::<Service>().unwrap(), s);
            assert_eq!(Service::from_code(s as u8), s);
        }
        assert!("http".parse::<Service>().unwrap_err().to_string().contains("unknown service"));
    }

    #[test]
    fn expiry() {
        let r = route("10.0.0.1:22");
        assert!(!r.expired_at(1_699_999_999_999));
        assert!(r.expired_at(1_700_000_000_000));
        assert!(!Route::to("10.0.0.1:22".parse().unwrap()).expired_at(u64::MAX));
    }

    #[test]
    fn upstream_parsing() {
        assert_eq!(parse_upstream("[::1]:22").unwrap(), "[::1]:22".parse().unwrap());
        assert!(parse_upstream("example.com:22").is_err());
        assert!(parse_upstream("10.0.0.1").is_err());
        assert!(parse_upstream("10.0.0.1:0").unwrap_err().to_string().contains("port 0"));
        assert!(parse_upstream("10.0.0.1:65536").is_err());
        let err = parse_upstream("[fe80::1%2]:22").unwrap_err().to_string();
        assert!(err.contains("scope id"), "{err}");
    }

    #[test]
    fn validate_refuses_scope_ids_and_expiry_zero() {
        let mut r = route("10.0.0.1:22");
        r.expires_ms = Some(0);
        assert!(r.validate().unwrap_err().to_string().contains("expiry 0"));
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, 22, 0, 3));
        let err = Route::to(scoped).validate().unwrap_err().to_string();
        assert!(err.contains("scope id"), "{err}");
        assert!(route("[::1]:22").validate().is_ok());
    }
}
