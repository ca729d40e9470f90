//! `gpugate-bench`: the gateway against the approaches it replaces, measured side by side in one
//! run on this machine, reported as ratios (`make bench` runs it; see scripts/bench.sh).
//!
//! 1. Data path: connection rate and one-connection throughput through the module (both proxy
//!    forms) against a static `proxy_pass` on the same nginx to the same backend, interleaved.
//! 2. Route activation: table write → first proxied round trip, against a per-port config file
//!    + `nginx -t` + `nginx -s reload` with the same number of existing ports.
//! 3. Footprint: nginx processes and memory before/after many route changes against many
//!    reloads, with long-lived connections open.
//! 4. Routing by TLS server name: TLS connection rate against a static `ssl` server, and
//!    name-route activation with many name routes in the table ([`tls`]).
//!
//! Sizes come from `GPUGATE_BENCH_*` environment variables (see [`Config`]); the lookup cost
//! (criterion) is measured by scripts/bench.sh and passed in to be printed with the rest.

mod load;
mod ports;
mod procs;
mod reload;
mod report;
mod timers;
mod tls;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gpugate_tests::{nginx_conf_with, ConfOptions, 
    route, table_dir, temp_dir, Backend, Client, LockMode, Nginx, Service, Writer,
};

use load::{
    bulk, conn_rate, echo_server, first_success, median, paired_ratio, percentile, source_server,
    spread,
};
use ports::{listen_lines, Ports};
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
    /// GPUGATE_BENCH_IDLE_SESSIONS: idle sessions held for the flush-timer cost (0: skip).
    idle_sessions: usize,
    /// GPUGATE_BENCH_IDLE_SECS: how long their CPU is measured, per side.
    idle_secs: u64,
    /// GPUGATE_BENCH_TLS_ROUNDS: rotated rounds of the TLS connection-rate runs (0: skip TLS).
    tls_rounds: usize,
    /// GPUGATE_BENCH_TLS_MS: length of one TLS connection-rate run.
    tls_ms: u64,
    /// GPUGATE_BENCH_NAMES: name routes in the table of the TLS runs.
    names: usize,
    /// GPUGATE_BENCH_NAME_ACTIVATIONS: name-route activations measured.
    name_activations: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Config {
    fn from_env() -> Config {
        Config {
            rate_rounds: env_or("GPUGATE_BENCH_RATE_ROUNDS", 9),
            rate_ms: env_or("GPUGATE_BENCH_RATE_MS", 1200),
            clients: env_or("GPUGATE_BENCH_CLIENTS", 4),
            bulk_rounds: env_or("GPUGATE_BENCH_BULK_ROUNDS", 7),
            bulk_mb: env_or("GPUGATE_BENCH_BULK_MB", 2000),
            ports: env_or("GPUGATE_BENCH_PORTS", 10_000),
            activations: env_or("GPUGATE_BENCH_ACTIVATIONS", 200),
            reload_activations: env_or("GPUGATE_BENCH_RELOAD_ACTIVATIONS", 10),
            changes: env_or("GPUGATE_BENCH_CHANGES", 10_000),
            reloads: env_or("GPUGATE_BENCH_RELOADS", 100),
            conns: env_or("GPUGATE_BENCH_CONNS", 100),
            idle_sessions: env_or("GPUGATE_BENCH_IDLE_SESSIONS", 5000),
            idle_secs: env_or("GPUGATE_BENCH_IDLE_SECS", 60),
            tls_rounds: env_or("GPUGATE_BENCH_TLS_ROUNDS", 7),
            tls_ms: env_or("GPUGATE_BENCH_TLS_MS", 2000),
            names: env_or("GPUGATE_BENCH_NAMES", 100_000),
            name_activations: env_or("GPUGATE_BENCH_NAME_ACTIVATIONS", 200),
        }
    }
}

/// nginx.conf for every nginx of the run: the gateway's process settings (as the test
/// support's `nginx_conf`), sized for 10,000+ listening sockets, which each worker counts
/// against `worker_connections`. The baseline is the same file without `load_module`.
pub fn nginx_config(module: bool, stream_body: &str) -> String {
    let opts = ConfOptions { load_module: module, worker_connections: 16384, rlimit_nofile: 19000 };
    nginx_conf_with(stream_body, opts)
}

pub(crate) fn progress(msg: &str) {
    eprintln!("[gpugate-bench] {msg}");
}

/// The command line: criterion's medians to print, where to write the report.
#[derive(Default)]
struct Args {
    /// `--lookup-live-ns`, `--lookup-miss-ns`: `Table::lookup_owned`, route and miss.
    lookup: (Option<f64>, Option<f64>),
    /// `--lookup-host-live-ns`, `--lookup-host-miss-ns`: `Table::lookup_host`, the same.
    lookup_host: (Option<f64>, Option<f64>),
    /// `--out PATH`: a copy of the report.
    out: Option<String>,
}

/// `--lookup-live-ns X --lookup-miss-ns Y --lookup-host-live-ns X --lookup-host-miss-ns Y
/// --out PATH`, all optional.
fn args() -> Args {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next();
        let ns = || v.as_deref().and_then(|v| v.parse().ok());
        match a.as_str() {
            "--lookup-live-ns" => args.lookup.0 = ns(),
            "--lookup-miss-ns" => args.lookup.1 = ns(),
            "--lookup-host-live-ns" => args.lookup_host.0 = ns(),
            "--lookup-host-miss-ns" => args.lookup_host.1 = ns(),
            "--out" => args.out = v,
            other => {
                eprintln!("gpugate-bench: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    args
}

fn main() {
    let Args { lookup, lookup_host, out } = args();
    let cfg = Config::from_env();
    assert!(cfg.changes as u64 >= cfg.conns as u64, "one connection per changes/conns route changes");

    let echo = echo_server(2 * cfg.clients);
    let source = source_server();
    // Long-lived sessions: a thread per connection, greets with "hold\n".
    let hold = Backend::start("hold", "127.0.0.1:0");

    let mut report = Report::new(cfg.clients, cfg.rate_rounds, cfg.rate_ms, cfg.bulk_rounds, cfg.bulk_mb);
    // Every port is on 127.0.0.1, below the ephemeral range, and free when handed out; each
    // phase stops its nginx before the next one takes ports.
    data_path(&cfg, &mut Ports::new(), echo, source, &mut report);
    let names = (cfg.tls_rounds > 0).then(|| tls::measure(&cfg, echo));
    gateway_control(&cfg, &mut Ports::new(), echo, hold.addr, &mut report);
    reload_control(&cfg, &mut Ports::new(), echo, hold.addr, &mut report);
    report.lookup_ns = lookup;
    report.lookup_host_ns = lookup_host;
    let timers = (cfg.idle_sessions > 0).then(|| timers::measure(hold.addr, cfg.idle_sessions, cfg.idle_secs));

    let mut text = report.render(&cfg);
    if let Some(n) = names {
        n.render(&mut text);
    }
    if let Some(t) = timers {
        t.render(&mut text);
    }
    print!("{text}");
    if let Some(path) = out {
        if let Err(e) = std::fs::write(&path, &text) {
            eprintln!("gpugate-bench: cannot write {path}: {e}");
        }
    }
}

/// Rate and throughput: one nginx with a static server and both routed forms, same backend.
fn data_path(cfg: &Config, ports: &mut Ports, echo: SocketAddr, source: SocketAddr, report: &mut Report) {
    progress("data path: starting nginx (static, balancer, variable)");
    let root = temp_dir("bench-data");
    let table = table_dir(&root).join("routes");
    let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
    let p = ports.take(4);
    let [stat, bal, var, stat_src] = [p[0], p[1], p[2], p[3]];
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
    let ng = Nginx::start(&root, &nginx_config(true, &body));
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
    let rate_ports = [stat, bal, var];
    for round in 0..cfg.rate_rounds {
        progress(&format!("connection rate: round {}/{}", round + 1, cfg.rate_rounds));
        // Rotate the order every round so no form always runs first or last.
        for k in 0..3 {
            let i = (round + k) % 3;
            let (rate, f) = conn_rate(rate_ports[i], cfg.clients, dur);
            rates[i].push(rate);
            failed[i] += f;
        }
    }
    report.rate_ratio = [1, 2].map(|i| paired_ratio(&rates[i], &rates[0]));
    report.rate_spread = rates.each_ref().map(|v| spread(v));
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
    report.bulk_ratio = [1, 2].map(|i| paired_ratio(&mbps[i], &mbps[0]));
    report.bulk_spread = mbps.each_ref().map(|v| spread(v));
    report.bulk = mbps.map(|mut v| median(&mut v));
    ng.assert_no_crash();
}

/// Activation and footprint on the gateway: a pool of `ports` routed ports plus the ports
/// the benchmark activates, one nginx that is never reloaded.
fn gateway_control(cfg: &Config, ports: &mut Ports, echo: SocketAddr, hold: SocketAddr, report: &mut Report) {
    let root = temp_dir("bench-gateway");
    let table = table_dir(&root).join("routes");
    let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
    let pool = ports.take(usize::from(cfg.ports) + usize::from(cfg.activations));
    let (routed, fresh) = pool.split_at(usize::from(cfg.ports));
    progress(&format!("gateway: starting nginx on {} ports with {} routes", pool.len(), routed.len()));
    for &port in routed {
        w.set(port, &route(hold, "benchexisting", Service::Ssh)).expect("set route");
    }
    let body = format!(
        r#"
    gpugate_route_table {table};
    upstream gpugate {{ gpugate_balancer; }}
    server {{
{listen}        gpugate_route on;
        proxy_pass gpugate;
    }}
"#,
        table = table.display(),
        listen = listen_lines(&pool),
    );
    let ng = Nginx::start(&root, &nginx_config(true, &body));

    progress(&format!("gateway: {} route activations", cfg.activations));
    let (mut ms, mut reference, mut first_try) = (Vec::new(), Vec::new(), 0);
    for &port in fresh {
        let start = Instant::now();
        w.set(port, &route(echo, "benchnew", Service::Ssh)).expect("set route");
        let (t, attempts) = first_success(port, start, Duration::ZERO, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("port {port} never answered after its route was set"));
        ms.push(t.as_secs_f64() * 1e3);
        first_try += usize::from(attempts == 1);
        // Reference: the same round trip on the now-routed port, right after. Activation can
        // be no faster than this; the difference is what the route change costs.
        let again = Instant::now();
        let (t, _) = first_success(port, again, Duration::ZERO, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("port {port} stopped answering"));
        reference.push(t.as_secs_f64() * 1e3);
    }
    report.activation[0] = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0), ms.len());
    report.activation_reference =
        (percentile(&mut reference, 50.0), percentile(&mut reference, 99.0), first_try);

    let master = ng.master_pid();
    let mut generation = 1;
    for (k, arrival) in Arrival::ORDER.into_iter().enumerate() {
        progress(&format!(
            "gateway: {} route changes, {} long-lived connections {}",
            cfg.changes, cfg.conns, arrival.describe()
        ));
        let mut held: Vec<Client> = Vec::new();
        if arrival == Arrival::UpFront {
            held.extend(routed.iter().cycle().take(usize::from(cfg.conns)).map(|&p| open_held(p)));
        }
        settle(master, Duration::from_secs(5));
        let before = footprint(master);
        let every = (cfg.changes / u32::from(cfg.conns)).max(1);
        for j in 0..cfg.changes {
            let port = routed[j as usize % routed.len()];
            generation += 1;
            let mut r = route(hold, "benchchange", Service::Ssh);
            r.generation = generation;
            w.set(port, &r).expect("change route");
            if arrival == Arrival::Spread && (j + 1) % every == 0 && held.len() < usize::from(cfg.conns) {
                held.push(open_held(port));
            }
        }
        settle(master, Duration::from_secs(5));
        let after = footprint(master);
        report.footprint[k][0] = (before, after, check_held(&mut held), held.len());
        drop(held);
    }
    ng.assert_no_crash();
}

/// Activation and footprint of the reload approach, measured the same way.
fn reload_control(cfg: &Config, ports: &mut Ports, echo: SocketAddr, hold: SocketAddr, report: &mut Report) {
    let root = temp_dir("bench-reload");
    progress(&format!("reload baseline: writing {} port files, starting nginx", cfg.ports));
    let existing = ports.take(usize::from(cfg.ports));
    let fresh = ports.take(usize::from(cfg.reload_activations) + 2 * usize::from(cfg.reloads));
    let mut fresh = fresh.into_iter();
    let gw = ReloadGateway::start(&root, existing.iter().copied(), hold);
    let master = gw.nginx.master_pid();

    let mut ms = Vec::new();
    for i in 0..cfg.reload_activations {
        progress(&format!("reload baseline: activation {}/{}", i + 1, cfg.reload_activations));
        let port = fresh.next().expect("a port for the activation");
        let t = gw.activate(port, echo).unwrap_or_else(|e| panic!("{e}"));
        ms.push(t.as_secs_f64() * 1e3);
    }
    report.activation[1] = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0), ms.len());

    for (k, arrival) in Arrival::ORDER.into_iter().enumerate() {
        let mut held: Vec<Client> = Vec::new();
        let open = |held: &mut Vec<Client>| {
            let port = existing[held.len() % existing.len()];
            held.push(open_held(port));
        };
        if arrival == Arrival::UpFront {
            while held.len() < usize::from(cfg.conns) {
                open(&mut held);
            }
        }
        settle(master, Duration::from_secs(10));
        let before = footprint(master);
        let per = (cfg.conns / cfg.reloads.max(1)).max(1);
        for i in 0..cfg.reloads {
            if i % 10 == 0 {
                progress(&format!(
                    "reload baseline: reload {}/{}, connections {} ({} processes)",
                    i + 1,
                    cfg.reloads,
                    arrival.describe(),
                    footprint(master).processes
                ));
            }
            if arrival == Arrival::Spread {
                for _ in 0..per {
                    if held.len() < usize::from(cfg.conns) {
                        open(&mut held);
                    }
                }
            }
            let port = fresh.next().expect("a port for the reload");
            gw.activate(port, echo).unwrap_or_else(|e| panic!("{e}"));
        }
        while held.len() < usize::from(cfg.conns) {
            open(&mut held);
        }
        settle(master, Duration::from_secs(10));
        let after = footprint(master);
        report.footprint[k][1] = (before, after, check_held(&mut held), held.len());
        // Closing the sessions lets the old workers exit before the next scenario.
        drop(held);
        settle(master, Duration::from_secs(10));
    }
    gw.nginx.assert_no_crash();
}

/// When the long-lived connections of a footprint run open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// One after each `changes / conns` route changes, or before each reload: sessions arrive
    /// while routes change, as in production. "Before" is the idle gateway.
    Spread,
    /// All open before the first change and stay open: "before" already holds them.
    UpFront,
}

impl Arrival {
    /// The order the runs go in (the idle "before" of `Spread` comes first).
    pub const ORDER: [Arrival; 2] = [Arrival::Spread, Arrival::UpFront];

    pub fn describe(self) -> &'static str {
        match self {
            Arrival::Spread => "arriving during the changes",
            Arrival::UpFront => "open before the changes",
        }
    }
}

/// Opens a long-lived connection through `port` and checks it reached the hold backend.
pub(crate) fn open_held(port: u16) -> Client {
    let mut c = Client::connect(port).unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    let greeting = c.read_line();
    assert_eq!(greeting.as_deref(), Some("hold"), "long-lived connection on port {port}");
    c
}

/// How many held connections still answer a round trip.
pub(crate) fn check_held(held: &mut [Client]) -> usize {
    held.iter_mut().filter_map(|c| c.round_trip("ping").filter(|r| r == "hold:ping")).count()
}
