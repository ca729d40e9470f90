//! What the multi-process table tests share: routes whose every field derives from their
//! generation, so that a reader can tell a torn copy (fields of two writes) from a whole one.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use gpugate_routes::{Route, Service};

/// The route written at generation `n`: IPv4 on even, IPv6 on odd generations; the env id
/// starts with `prefix`.
pub fn route_for(prefix: char, n: u64) -> Route {
    let port = (n % 60000) as u16 + 1;
    let upstream = if n % 2 == 0 {
        SocketAddr::new(Ipv4Addr::from((n as u32).wrapping_mul(2654435761)).into(), port)
    } else {
        SocketAddr::new(Ipv6Addr::from((n as u128) << 64 | n as u128).into(), port)
    };
    Route {
        upstream,
        env_id: format!("{prefix}{:x}", n % 0xffff_ffff).parse().expect("env id"),
        service: Service::ALL[(n % 5) as usize],
        generation: n,
        expires_ms: Some(u64::MAX - n),
    }
}
