//! `gpugate-bench`: the gateway against the approaches it replaces, measured side by side in one
//! run on this machine, reported as ratios (`make bench` runs it; see scripts/bench.sh).
//!
//! 1. Data path: connection rate and one-connection throughput through the module (both proxy
//!    forms) against a static `proxy_pass` on the same nginx to the same backend, interleaved.
//! 2. Route activation: table write → first proxied round trip, against a per-port config file
//!    + `nginx -t` + `nginx -s reload` with the same number of existing ports.
//! 3. Footprint: nginx processes and memory before/after many route changes against many
//!    reloads, with long-lived connections open.
//!
//! Sizes come from `GPUGATE_BENCH_*` environment variables (see [`Config`]); the lookup cost
//! (criterion) is measured by scripts/bench.sh and passed in to be printed with the rest.

mod load;
mod procs;
mod reload;
mod report;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gpugate_tests::{
    nginx_conf, route, table_dir, temp_dir, Backend, Client, LockMode, Nginx, Service, Writer,
};

use load::{bulk, conn_rate, echo_server, first_success, median, percentile, source_server};
use procs::{footprint, settle};
use reload::ReloadGateway;
use report::Report;

/// Sizes of the run, each overridable by an environment variable of the same name.
struct Config {
    /// GPUGATE_BENCH_RATE_ROUNDS: interleaved rounds of the connection-rate runs.
    rate_rounds: usize,
    /// GPUGATE_BENCH_RATE_MS: length of one connection-rate run.
    rate_ms: u64,
    /// GPUGATE_BENCH_CLIENTS: concurrent client threads in a connection-rate run.
    clients: usize,
    /// GPUGATE_BENCH_BULK_ROUNDS: interleaved rounds of the throughput runs.
    bulk_rounds: usize,
    /// GPUGATE_BENCH_BULK_MB: bytes streamed over one connection per throughput run, MB.
    bulk_mb: u64,
    /// GPUGATE_BENCH_PORTS: existing routed ports (and per-port files for the baseline).
    ports: u16,
    /// GPUGATE_BENCH_ACTIVATIONS: route activations measured on the gateway.
    activations: u16,
    /// GPUGATE_BENCH_RELOAD_ACTIVATIONS: activations measured on the reload baseline.
    reload_activations: u16,
    /// GPUGATE_BENCH_CHANGES: route changes on the gateway in the footprint run.
    changes: u32,
    /// GPUGATE_BENCH_RELOADS: reloads of the baseline in the footprint run.
    reloads: u16,
    /// GPUGATE_BENCH_CONNS: long-lived connections opened during the footprint runs.
    conns: u16,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Config {
    fn from_env() -> Config {
        Config {
            rate_rounds: env_or("GPUGATE_BENCH_RATE_ROUNDS", 7),
            rate_ms: env_or("GPUGATE_BENCH_RATE_MS", 1500),
            clients: env_or("GPUGATE_BENCH_CLIENTS", 4),
            bulk_rounds: env_or("GPUGATE_BENCH_BULK_ROUNDS", 5),
            bulk_mb: env_or("GPUGATE_BENCH_BULK_MB", 2000),
            ports: env_or("GPUGATE_BENCH_PORTS", 10_000),
            activations: env_or("GPUGATE_BENCH_ACTIVATIONS", 200),
            reload_activations: env_or("GPUGATE_BENCH_RELOAD_ACTIVATIONS", 10),
            changes: env_or("GPUGATE_BENCH_CHANGES", 10_000),
            reloads: env_or("GPUGATE_BENCH_RELOADS", 100),
            conns: env_or("GPUGATE_BENCH_CONNS", 100),
        }
    }
}

// Port plan, all on 127.0.0.1 and below the kernel's ephemeral range (32768-60999).
/// Data path: static → echo, balancer, variable, static → source.
const DATA_PORTS: [u16; 4] = [9000, 9001, 9002, 9003];
/// Gateway pool: `ports` routed ports, then the ports activated by the benchmark.
const POOL_LO: u16 = 21000;
/// Baseline: `ports` existing per-port files from here.
const RELOAD_LO: u16 = 10000;
/// Baseline: ports activated by a reload, from here.
const RELOAD_NEW_LO: u16 = 20000;

fn progress(msg: &str) {
    eprintln!("[gpugate-bench] {msg}");
}

/// `--lookup-live-ns X --lookup-miss-ns Y --out PATH`, all optional.
fn args() -> (Option<f64>, Option<f64>, Option<String>) {
    let (mut live, mut miss, mut out) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next();
        match a.as_str() {
            "--lookup-live-ns" => live = v.and_then(|v| v.parse().ok()),
            "--lookup-miss-ns" => miss = v.and_then(|v| v.parse().ok()),
            "--out" => out = v,
            other => {
                eprintln!("gpugate-bench: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    (live, miss, out)
}

fn main() {
    let (lookup_live, lookup_miss, out) = args();
    let cfg = Config::from_env();
    assert!(u32::from(RELOAD_LO) + u32::from(cfg.ports) <= u32::from(RELOAD_NEW_LO));
    assert!(u32::from(RELOAD_NEW_LO) + u32::from(cfg.reload_activations + cfg.reloads) <= u32::from(POOL_LO));
    assert!(u32::from(POOL_LO) + u32::from(cfg.ports + cfg.activations) < 32768);
    assert!(cfg.changes as u64 >= cfg.conns as u64, "one connection per changes/conns route changes");

    let echo = echo_server(2 * cfg.clients);
    let source = source_server();
    // Long-lived sessions: a thread per connection, greets with "hold\n".
    let hold = Backend::start("hold", "127.0.0.1:0");

    let mut report = Report::new(cfg.clients, cfg.rate_rounds, cfg.rate_ms, cfg.bulk_rounds, cfg.bulk_mb);
    data_path(&cfg, echo, source, &mut report);
    gateway_control(&cfg, echo, hold.addr, &mut report);
    reload_control(&cfg, echo, hold.addr, &mut report);
    report.lookup_ns = (lookup_live, lookup_miss);

    let text = report.render(&cfg);
    print!("{text}");
    if let Some(path) = out {
        if let Err(e) = std::fs::write(&path, &text) {
            eprintln!("gpugate-bench: cannot write {path}: {e}");
        }
    }
}

/// Rate and throughput: one nginx with a static server and both routed forms, same backend.
fn data_path(cfg: &Config, echo: SocketAddr, source: SocketAddr, report: &mut Report) {
    progress("data path: starting nginx (static, balancer, variable)");
    let root = temp_dir("bench-data");
    let table = table_dir(&root).join("routes");
    let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
    let [stat, bal, var, stat_src] = DATA_PORTS;
    let body = format!(
        r#"
    gpugate_route_table {table};
    upstream gpugate {{ gpugate_balancer; }}
    server {{ listen 127.0.0.1:{stat}; proxy_pass {echo}; }}
    server {{ listen 127.0.0.1:{stat_src}; proxy_pass {source}; }}
    server {{ listen 127.0.0.1:{bal}; gpugate_route on; proxy_pass gpugate; }}
    server {{ listen 127.0.0.1:{var}; gpugate_route on; proxy_pass $gpugate_upstream; }}
"#,
        table = table.display()
    );
    let ng = Nginx::start(&root, &nginx_conf(&body));
    for port in [bal, var] {
        w.set(port, &route(echo, "benchrate", Service::Other)).expect("set route");
    }

    // Warm-up, discarded: first connections fault in pages and fill caches.
    for port in [stat, bal, var] {
        conn_rate(port, cfg.clients, Duration::from_millis(300));
    }
    let dur = Duration::from_millis(cfg.rate_ms);
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut failed = [0u64; 3];
    let ports = [stat, bal, var];
    for round in 0..cfg.rate_rounds {
        progress(&format!("connection rate: round {}/{}", round + 1, cfg.rate_rounds));
        // Rotate the order every round so no form always runs first or last.
        for k in 0..3 {
            let i = (round + k) % 3;
            let (rate, f) = conn_rate(ports[i], cfg.clients, dur);
            rates[i].push(rate);
            failed[i] += f;
        }
    }
    report.rate = rates.map(|mut v| median(&mut v));
    report.rate_failed = failed;

    // Throughput: re-point the routed ports at the source (no reload needed).
    for port in [bal, var] {
        w.set(port, &route(source, "benchbulk", Service::Other)).expect("set route");
    }
    let bulk_ports = [stat_src, bal, var];
    let total = cfg.bulk_mb * 1_000_000;
    let mut mbps: [Vec<f64>; 3] = Default::default();
    for round in 0..cfg.bulk_rounds {
        progress(&format!("bulk throughput: round {}/{}", round + 1, cfg.bulk_rounds));
        for k in 0..3 {
            let i = (round + k) % 3;
            let bps = bulk(bulk_ports[i], total).expect("bulk transfer");
            mbps[i].push(bps / 1e6);
        }
    }
    report.bulk = mbps.map(|mut v| median(&mut v));
    ng.assert_no_crash();
}

/// Activation and footprint on the gateway: a pool of `ports` routed ports plus the ports
/// the benchmark activates, one nginx that is never reloaded.
fn gateway_control(cfg: &Config, echo: SocketAddr, hold: SocketAddr, report: &mut Report) {
    let root = temp_dir("bench-gateway");
    let table = table_dir(&root).join("routes");
    let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
    let hi = POOL_LO + cfg.ports + cfg.activations - 1;
    progress(&format!("gateway: starting nginx on {} ports with {} routes", hi - POOL_LO + 1, cfg.ports));
    for port in POOL_LO..POOL_LO + cfg.ports {
        w.set(port, &route(hold, "benchexisting", Service::Ssh)).expect("set route");
    }
    let body = format!(
        r#"
    gpugate_route_table {table};
    upstream gpugate {{ gpugate_balancer; }}
    server {{
        listen 127.0.0.1:{POOL_LO}-{hi};
        gpugate_route on;
        proxy_pass gpugate;
    }}
"#,
        table = table.display()
    );
    let ng = Nginx::start(&root, &nginx_conf(&body));

    progress(&format!("gateway: {} route activations", cfg.activations));
    let mut ms = Vec::new();
    for port in POOL_LO + cfg.ports..=hi {
        let start = Instant::now();
        w.set(port, &route(echo, "benchnew", Service::Ssh)).expect("set route");
        let t = first_success(port, start, Duration::ZERO, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("port {port} never answered after its route was set"));
        ms.push(t.as_secs_f64() * 1e3);
    }
    report.activation[0] = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0), ms.len());

    progress(&format!("gateway: {} route changes, {} long-lived connections", cfg.changes, cfg.conns));
    let master = ng.master_pid();
    settle(master, Duration::from_secs(5));
    let before = footprint(master);
    let mut held: Vec<Client> = Vec::new();
    let every = cfg.changes / u32::from(cfg.conns);
    for j in 0..cfg.changes {
        let port = POOL_LO + (j % u32::from(cfg.ports)) as u16;
        let mut r = route(hold, "benchchange", Service::Ssh);
        r.generation = u64::from(j) + 2;
        w.set(port, &r).expect("change route");
        if (j + 1) % every == 0 && held.len() < usize::from(cfg.conns) {
            held.push(open_held(port));
        }
    }
    settle(master, Duration::from_secs(5));
    let after = footprint(master);
    assert_eq!(held.len(), usize::from(cfg.conns));
    report.footprint[0] = (before, after, check_held(&mut held));
    ng.assert_no_crash();
    drop(held);
}

/// Activation and footprint of the reload approach, measured the same way.
fn reload_control(cfg: &Config, echo: SocketAddr, hold: SocketAddr, report: &mut Report) {
    let root = temp_dir("bench-reload");
    progress(&format!("reload baseline: writing {} port files, starting nginx", cfg.ports));
    let gw = ReloadGateway::start(&root, RELOAD_LO..RELOAD_LO + cfg.ports, hold);
    let master = gw.nginx.master_pid();

    let mut ms = Vec::new();
    let mut next = RELOAD_NEW_LO;
    for i in 0..cfg.reload_activations {
        progress(&format!("reload baseline: activation {}/{}", i + 1, cfg.reload_activations));
        let t = gw.activate(next, echo).unwrap_or_else(|e| panic!("{e}"));
        next += 1;
        ms.push(t.as_secs_f64() * 1e3);
    }
    report.activation[1] = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0), ms.len());

    settle(master, Duration::from_secs(10));
    let before = footprint(master);
    let mut held: Vec<Client> = Vec::new();
    let per = (cfg.conns / cfg.reloads.max(1)).max(1);
    for i in 0..cfg.reloads {
        if i % 10 == 0 {
            progress(&format!("reload baseline: reload {}/{} ({} processes)", i + 1, cfg.reloads, footprint(master).processes));
        }
        // Sessions arrive between changes, as they do in production: each reload leaves the
        // workers that hold one behind.
        for _ in 0..per {
            if held.len() < usize::from(cfg.conns) {
                held.push(open_held(RELOAD_LO + held.len() as u16 % cfg.ports));
            }
        }
        gw.activate(next, echo).unwrap_or_else(|e| panic!("{e}"));
        next += 1;
    }
    while held.len() < usize::from(cfg.conns) {
        held.push(open_held(RELOAD_LO + held.len() as u16 % cfg.ports));
    }
    settle(master, Duration::from_secs(10));
    let after = footprint(master);
    report.footprint[1] = (before, after, check_held(&mut held));
    gw.nginx.assert_no_crash();
    drop(held);
}

/// Opens a long-lived connection through `port` and checks it reached the hold backend.
fn open_held(port: u16) -> Client {
    let mut c = Client::connect(port).unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    let greeting = c.read_line();
    assert_eq!(greeting.as_deref(), Some("hold"), "long-lived connection on port {port}");
    c
}

/// How many held connections still answer a round trip.
fn check_held(held: &mut [Client]) -> usize {
    held.iter_mut().filter_map(|c| c.round_trip("ping").filter(|r| r == "hold:ping")).count()
}
