//! One route change (`set`, `rm` or `revoke`): its arguments, defined once for the single commands and for
//! the lines of `apply` so the two syntaxes cannot drift, its checks, and how it is written.

use std::fmt;
use std::net::SocketAddr;

use clap::{Args, Subcommand};
use gpugate_routes::{now_ms, parse_upstream, EnvId, Route, Service, Writer};

/// A change, as a command line or an `apply` line spells it.
#[derive(Subcommand, Debug)]
pub enum Change {
    /// Route local PORT to HOST:PORT (IPv6 as [::1]:22); creates the table if missing.
    Set(SetArgs),
    /// Remove the route of PORT.
    Rm(RmArgs),
    /// Close every session open on PORT (within nginx's gpugate_flush_interval); the route
    /// stays and new connections still work.
    Revoke(RmArgs),
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The local (listening) port, 1-65535.
    port: u16,
    /// The upstream, an IP address and port.
    #[arg(value_parser = parse_upstream_arg)]
    upstream: SocketAddr,
    /// The environment id (up to 16 of a-z, 0-9, '-', '_').
    #[arg(long = "env", default_value = "")]
    env: String,
    /// ssh, jupyter, code, rdp or other.
    #[arg(long, default_value = "other")]
    service: String,
    /// Seconds until the route stops accepting new connections.
    #[arg(long)]
    ttl: Option<u64>,
    /// The route generation (default: the table's next generation).
    #[arg(long)]
    generation: Option<u64>,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// The local port, 1-65535.
    port: u16,
}

fn parse_upstream_arg(s: &str) -> Result<SocketAddr, String> {
    parse_upstream(s).map_err(|e| e.to_string())
}

/// A change whose arguments passed every check that needs no table.
#[derive(Debug)]
pub enum Checked {
    Set {
        port: u16,
        upstream: SocketAddr,
        env_id: EnvId,
        service: Service,
        ttl_s: Option<u64>,
        generation: Option<u64>,
    },
    Rm {
        port: u16,
    },
    Revoke {
        port: u16,
    },
}

/// What a change did, worded for the single commands' confirmation line.
pub enum Done {
    Set { port: u16, route: Route },
    Removed { port: u16 },
    Revoked { port: u16, epoch: u64 },
}

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Done::Set { port, route } => write!(
                f,
                "{port} -> {} (env {}, {}, generation {})",
                route.upstream, route.env_id, route.service, route.generation
            ),
            Done::Removed { port } => write!(f, "{port} removed"),
            Done::Revoked { port, epoch } => write!(f, "{port} sessions revoked (epoch {epoch})"),
        }
    }
}

fn routable(port: u16) -> Result<u16, String> {
    if port == 0 {
        return Err("port 0 cannot be routed (expected 1-65535)".into());
    }
    Ok(port)
}

impl Change {
    /// Checks the arguments before the table is touched, so a bad change writes nothing (and
    /// a bad single command does not even create the table).
    pub fn check(self) -> Result<Checked, String> {
        match self {
            Change::Set(a) => {
                let port = routable(a.port)?;
                let env_id: EnvId =
                    a.env.parse().map_err(|e: gpugate_routes::Error| e.to_string())?;
                let service: Service =
                    a.service.parse().map_err(|e: gpugate_routes::Error| e.to_string())?;
                if a.ttl == Some(0) {
                    return Err("--ttl must be at least 1 second".into());
                }
                Ok(Checked::Set {
                    port,
                    upstream: a.upstream,
                    env_id,
                    service,
                    ttl_s: a.ttl,
                    generation: a.generation,
                })
            }
            Change::Rm(a) => Ok(Checked::Rm { port: routable(a.port)? }),
            Change::Revoke(a) => Ok(Checked::Revoke { port: routable(a.port)? }),
        }
    }
}

impl Checked {
    /// Writes the change. A `set` without `--generation` takes the table's next generation; a
    /// `--ttl` counts from now. Removing a port that has no route is an error.
    pub fn apply(&self, w: &mut Writer) -> Result<Done, String> {
        match *self {
            Checked::Set { port, upstream, env_id, service, ttl_s, generation } => {
                let expires_ms = ttl_s.map(|s| now_ms().saturating_add(s.saturating_mul(1000)));
                let generation =
                    generation.unwrap_or_else(|| w.table().header_info().generation + 1);
                let route = Route { upstream, env_id, service, generation, expires_ms };
                w.set(port, &route).map_err(|e| e.to_string())?;
                Ok(Done::Set { port, route })
            }
            Checked::Rm { port } => {
                if !w.remove(port).map_err(|e| e.to_string())? {
                    return Err(format!("port {port} has no route"));
                }
                Ok(Done::Removed { port })
            }
            Checked::Revoke { port } => {
                let epoch = w.revoke(port).map_err(|e| e.to_string())?;
                Ok(Done::Revoked { port, epoch })
            }
        }
    }
}
