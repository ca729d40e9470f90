//! `dump`: the routes of the table with their state and counters, as a table or JSON, optionally
//! narrowed to one environment, one service or a port range. Read-only; never takes the lock.

use std::io::{self, BufWriter, Write};
use std::ops::RangeInclusive;

use clap::Args;
use gpugate_routes::{now_ms, Counters, EnvId, Lookup, Route, Service, Table};

use crate::out::Failure;

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the routes of this environment id.
    #[arg(long = "env", value_name = "ID", value_parser = parse_env)]
    env: Option<EnvId>,
    /// Only the routes of this service: ssh, jupyter, code, rdp or other.
    #[arg(long, value_name = "NAME", value_parser = parse_service)]
    service: Option<Service>,
    /// Only the ports in LO-HI, both included (a single PORT also works).
    #[arg(long, value_name = "LO-HI", value_parser = parse_ports)]
    ports: Option<RangeInclusive<u16>>,
}

fn parse_env(s: &str) -> Result<EnvId, String> {
    s.parse().map_err(|e: gpugate_routes::Error| e.to_string())
}

fn parse_service(s: &str) -> Result<Service, String> {
    s.parse().map_err(|e: gpugate_routes::Error| e.to_string())
}

/// `LO-HI` (or one port) with 1 <= LO <= HI <= 65535.
fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => {
            Err(format!("\"{s}\" is not a port range (expected LO-HI within 1-65535)"))
        }
        Ok(p) => Ok(p),
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => (port(s)?, port(s)?),
    };
    if lo > hi {
        return Err(format!("port range \"{s}\" is empty (LO is above HI)"));
    }
    Ok(lo..=hi)
}

impl DumpArgs {
    fn wants(&self, port: u16, r: &Route) -> bool {
        self.env.is_none_or(|e| e == r.env_id)
            && self.service.is_none_or(|s| s == r.service)
            && self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

#[derive(serde::Serialize)]
struct DumpRoute {
    port: u16,
    upstream: String,
    env_id: String,
    service: &'static str,
    generation: u64,
    expires_ms: Option<u64>,
    state: &'static str,
    counters: Counters,
}

/// Prints the routes `args` selects to stdout.
pub fn run(t: &Table, args: &DumpArgs) -> Result<(), Failure> {
    let mut out = BufWriter::new(io::stdout().lock());
    write(t, args, &mut out).and_then(|()| out.flush()).map_err(Failure::stdout)
}

fn write(t: &Table, args: &DumpArgs, o: &mut impl Write) -> io::Result<()> {
    let now = now_ms();
    let rows: Vec<DumpRoute> = t
        .routes()
        .filter(|(port, r)| args.wants(*port, r))
        .map(|(port, r)| DumpRoute {
            port,
            upstream: r.upstream.to_string(),
            env_id: r.env_id.to_string(),
            service: r.service.as_str(),
            generation: r.generation,
            expires_ms: r.expires_ms,
            state: match t.lookup(port, now) {
                Lookup::Live(_) => "live",
                Lookup::Expired(_) => "expired",
                Lookup::Absent => "removed",
                Lookup::Busy => "busy",
            },
            counters: t.counters(port),
        })
        .collect();
    let h = t.header_info();
    if args.json {
        let doc = serde_json::json!({
            "table": t.path(),
            "generation": h.generation,
            "heartbeat_ms": h.heartbeat_ms,
            "writer_pid": h.writer_pid,
            "routes": rows,
        });
        return writeln!(o, "{doc:#}");
    }
    writeln!(
        o,
        "# table {} generation {} writer pid {} heartbeat {} ms ago",
        t.path().display(),
        h.generation,
        h.writer_pid,
        now.saturating_sub(h.heartbeat_ms)
    )?;
    writeln!(
        o,
        "{:>5}  {:<40} {:<16} {:<7} {:>6} {:<7} {:>8} {:>6} {:>7} {:>6} {:>12} {:>12}",
        "PORT",
        "UPSTREAM",
        "ENV",
        "SERVICE",
        "GEN",
        "STATE",
        "CONNS",
        "ACTIVE",
        "REFUSED",
        "FAILED",
        "BYTES_IN",
        "BYTES_OUT"
    )?;
    for r in rows {
        writeln!(
            o,
            "{:>5}  {:<40} {:<16} {:<7} {:>6} {:<7} {:>8} {:>6} {:>7} {:>6} {:>12} {:>12}",
            r.port,
            r.upstream,
            r.env_id,
            r.service,
            r.generation,
            r.state,
            r.counters.connections_total,
            r.counters.connections_active,
            r.counters.refused_total,
            r.counters.upstream_failed_total,
            r.counters.bytes_in,
            r.counters.bytes_out
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ports;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("20000-20999"), Ok(20000..=20999));
        assert_eq!(parse_ports("22"), Ok(22..=22));
        assert_eq!(parse_ports("1-65535"), Ok(1..=65535));
        for bad in ["0-10", "10-5", "a-b", "1-65536", "", "-", "5-"] {
            assert!(parse_ports(bad).is_err(), "{bad:?} accepted");
        }
    }
}
