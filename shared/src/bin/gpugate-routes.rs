//! `gpugate-routes`: the operator's tool for the route table (init, set, rm, dump).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpugate_routes::{
    now_ms, parse_upstream, Counters, EnvId, LockMode, Lookup, Route, Service, Table, Writer,
    DEFAULT_TABLE_PATH,
};

/// Inspect and change the gpugate route table.
///
/// Writing takes the table's writer lock: while a publisher (gpugate-api) runs, `set`, `rm` and
/// `init` fail with the holder's pid. `dump` never takes the lock.
#[derive(Parser)]
#[command(name = "gpugate-routes", version)]
struct Cli {
    /// The route-table file.
    #[arg(long, global = true, env = "GPUGATE_ROUTE_TABLE", default_value = DEFAULT_TABLE_PATH)]
    table: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create and initialise the table file (does nothing to a valid existing table).
    Init,
    /// Route local PORT to HOST:PORT (IPv6 as [::1]:22); creates the table if missing.
    Set {
        /// The local (listening) port, 1-65535.
        port: u16,
        /// The upstream, an IP address and port.
        #[arg(value_parser = parse_upstream_arg)]
        upstream: std::net::SocketAddr,
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
    },
    /// Remove the route of PORT.
    Rm {
        /// The local port, 1-65535.
        port: u16,
    },
    /// Print every route with its counters; read-only, works beside a running writer.
    Dump {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_upstream_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    parse_upstream(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("gpugate-routes: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let err = |e: gpugate_routes::Error| e.to_string();
    match cli.cmd {
        Cmd::Init => {
            Writer::open(&cli.table, LockMode::NoWait).map_err(err)?;
            println!("route table {} ready", cli.table.display());
        }
        Cmd::Set { port, upstream, env, service, ttl, generation } => {
            if port == 0 {
                return Err("port 0 cannot be routed (expected 1-65535)".into());
            }
            let env_id: EnvId = env.parse().map_err(err)?;
            let service: Service = service.parse().map_err(err)?;
            let expires_ms = match ttl {
                None => None,
                Some(0) => return Err("--ttl must be at least 1 second".into()),
                Some(s) => Some(now_ms().saturating_add(s.saturating_mul(1000))),
            };
            let mut w = Writer::open(&cli.table, LockMode::NoWait).map_err(err)?;
            let generation = generation.unwrap_or_else(|| w.table().header_info().generation + 1);
            let route = Route { upstream, env_id, service, generation, expires_ms };
            w.set(port, &route).map_err(err)?;
            println!("{port} -> {upstream} (env {env_id}, {service}, generation {generation})");
        }
        Cmd::Rm { port } => {
            let mut w = Writer::open(&cli.table, LockMode::NoWait).map_err(err)?;
            if !w.remove(port).map_err(err)? {
                return Err(format!("port {port} has no route"));
            }
            println!("{port} removed");
        }
        Cmd::Dump { json } => {
            let t = Table::open_read_only(&cli.table).map_err(err)?;
            dump(&t, json);
        }
    }
    Ok(())
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

fn dump(t: &Table, json: bool) {
    let now = now_ms();
    let rows: Vec<DumpRoute> = t
        .routes()
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
    if json {
        let doc = serde_json::json!({
            "table": t.path(),
            "generation": h.generation,
            "heartbeat_ms": h.heartbeat_ms,
            "writer_pid": h.writer_pid,
            "routes": rows,
        });
        println!("{doc:#}");
        return;
    }
    println!(
        "# table {} generation {} writer pid {} heartbeat {} ms ago",
        t.path().display(),
        h.generation,
        h.writer_pid,
        now.saturating_sub(h.heartbeat_ms)
    );
    println!(
        "{:>5}  {:<40} {:<16} {:<7} {:>6} {:<7} {:>8} {:>6} {:>7} {:>12} {:>12}",
        "PORT", "UPSTREAM", "ENV", "SERVICE", "GEN", "STATE", "CONNS", "ACTIVE", "REFUSED",
        "BYTES_IN", "BYTES_OUT"
    );
    for r in rows {
        println!(
            "{:>5}  {:<40} {:<16} {:<7} {:>6} {:<7} {:>8} {:>6} {:>7} {:>12} {:>12}",
            r.port,
            r.upstream,
            r.env_id,
            r.service,
            r.generation,
            r.state,
            r.counters.connections_total,
            r.counters.connections_active,
            r.counters.refused_total,
            r.counters.bytes_in,
            r.counters.bytes_out
        );
    }
}
