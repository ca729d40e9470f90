//! Routing by TLS server name, measured side by side on one nginx to one backend:
//!
//! 1. Connection rate with a full TLS handshake and one request per connection through a
//!    terminating name-routed server (certificate named by a variable, `gpugate_name_route
//!    terminate`, `proxy_pass gpugate`) against a static `ssl` server (`ssl_certificate` a
//!    file, `proxy_pass` the backend), and a third server that only names its certificate by
//!    a variable: the share of the difference the certificate form accounts for.
//! 2. Name-route activation: with `names` name routes already in the table, `set_host` of a
//!    new name → first successful TLS round trip through the terminating server for that name.
//!
//! The client is rustls, in process: `openssl s_time` cannot send a server name (which the
//! name route needs), and a client process per connection costs milliseconds to start, far
//! more than the sub-millisecond activation being measured. Every handshake is a full one
//! (resumption off) and verifies the gateway's certificate against the development CA, as a
//! real client does; every server gets the same server name, so the client's work is the same.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpugate_tests::{route, table_dir, temp_dir, LockMode, Nginx, Service, Writer};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::load::{median, paired_ratio, percentile, spread};
use crate::ports::Ports;
use crate::{nginx_config, progress, Config};

/// The name domain of the run (the development certificate covers `*.jupyter.<DOMAIN>`).
const DOMAIN: &str = "gpu.example.com";
/// The three servers, in the order of the figures: static, name route, variable certificate.
const FORMS: [&str; 3] = ["static", "name route", "variable certificate"];

/// What the TLS phase measured.
#[derive(Debug, Default)]
pub struct NameRouting {
    /// Client threads, rounds, ms per run, name routes in the table.
    pub clients: usize,
    pub rounds: usize,
    pub ms: u64,
    pub names: usize,
    /// Connections/s, medians, in [`FORMS`] order.
    pub rate: [f64; 3],
    /// (min, max) of the runs, in [`FORMS`] order.
    pub spread: [(f64, f64); 3],
    /// Median of the per-round ratios to static: name route, variable certificate.
    pub paired: [f64; 2],
    /// Failed connections, in [`FORMS`] order.
    pub failed: [u64; 3],
    /// Activation: (p50 ms, p99 ms, samples).
    pub activation: (f64, f64, usize),
    /// A round trip on the name right after its activation: (p50 ms, p99 ms).
    pub reference: (f64, f64),
    /// Per activation, activation minus that reference: (p50 ms, p99 ms). What the route
    /// change itself adds to the TLS round trip that any client pays.
    pub over_floor: (f64, f64),
    /// Activations whose first attempt succeeded; names refused before their write.
    pub first_try: usize,
    pub refused_before: usize,
}

/// A TLS client for one server name: the shared configuration and the name it sends.
#[derive(Clone)]
struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    fn new(config: &Arc<ClientConfig>, host: String) -> TlsClient {
        let name = ServerName::try_from(host).expect("a DNS name");
        TlsClient { config: config.clone(), name }
    }

    /// Connects to 127.0.0.1:`port`, completes a full handshake, sends `msg` and reads as many
    /// bytes back (the echo backend's answer). A refused name fails here: nginx closes the
    /// connection after the handshake without a byte of the backend's.
    fn round_trip(&self, port: u16, msg: &[u8], reply: &mut [u8]) -> io::Result<()> {
        let sock = TcpStream::connect(("127.0.0.1", port))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let conn = ClientConnection::new(self.config.clone(), self.name.clone()).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, sock);
        tls.write_all(msg)?;
        tls.read_exact(reply)?;
        if reply != msg {
            return Err(io::Error::other("the backend's answer differs from the request"));
        }
        Ok(())
    }
}

/// TLS 1.3 only (one round trip, as a current client), full handshakes, the development CA.
fn client_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("read {}: {e:?}", ca.display()));
    for cert in certs {
        let cert = cert.unwrap_or_else(|e| panic!("parse {}: {e:?}", ca.display()));
        roots.add(cert).unwrap_or_else(|e| panic!("trust {}: {e}", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}


/// Random 16-character [a-z0-9] environment ids (splitmix64 seeded from the clock): ids the
/// control plane could hand out, fresh in every run.
struct Ids(u64);

impl Ids {
    fn new() -> Ids {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x6770_7567_6174_6531);
        Ids(seed)
    }

    fn next_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..16)
            .map(|_| {
                self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                char::from(ALPHABET[((z ^ (z >> 31)) % 36) as usize])
            })
            .collect()
    }
}

/// Connections per second through `port`: `threads` clients loop connect → handshake →
/// 64-byte request and its echo → close for `dur`. Failures are counted apart.
fn tls_rate(port: u16, client: &TlsClient, threads: usize, dur: Duration) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed, client) = (ok.clone(), failed.clone(), client.clone());
            std::thread::spawn(move || {
                let msg = [b'x'; 64];
                let mut reply = [0u8; 64];
                let (mut n_ok, mut n_failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match client.round_trip(port, &msg, &mut reply) {
                        Ok(()) => n_ok += 1,
                        Err(_) => n_failed += 1,
                    }
                }
                ok.fetch_add(n_ok, Ordering::Relaxed);
                failed.fetch_add(n_failed, Ordering::Relaxed);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    (ok.load(Ordering::Relaxed) as f64 / secs, failed.load(Ordering::Relaxed))
}

/// Time from `start` until a round trip for `client`'s name through `port` succeeds, retrying
/// at once for at most `limit`, and the attempts it took; `None` if it never did.
fn first_success(client: &TlsClient, port: u16, start: Instant, limit: Duration) -> Option<(Duration, u32)> {
    let mut reply = [0u8; 1];
    let mut attempts = 0;
    loop {
        attempts += 1;
        if client.round_trip(port, b"?", &mut reply).is_ok() {
            return Some((start.elapsed(), attempts));
        }
        if start.elapsed() > limit {
            return None;
        }
    }
}

/// Runs the TLS phase: one nginx with the three servers, `cfg.names` name routes in its table.
pub fn measure(cfg: &Config, echo: SocketAddr) -> NameRouting {
    let root = temp_dir("bench-tls");
    let tls = gpugate_tests::dev_tls(&root, DOMAIN);
    let config = client_config(&tls.join("ca.crt"));
    let table = table_dir(&root).join("routes");
    // The default hostname region (262,144 slots), as the publisher opens it.
    let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
    let mut ids = Ids::new();
    progress(&format!("TLS: writing {} name routes", cfg.names));
    for _ in 0..cfg.names {
        w.set_host(&route(echo, &ids.next_id(), Service::Jupyter)).expect("set a name route");
    }
    let bench_id = ids.next_id();
    w.set_host(&route(echo, &bench_id, Service::Jupyter)).expect("set the benchmark's name route");

    let p = Ports::new().take(3);
    let [stat, name, var] = [p[0], p[1], p[2]];
    let body = format!(
        r#"
    gpugate_route_table {table};
    gpugate_name_domain {DOMAIN};
    upstream gpugate {{ gpugate_balancer; }}
    ssl_protocols TLSv1.2 TLSv1.3;
    map $ssl_server_name $gpugate_tls {{ default gateway; }}
    server {{
        listen 127.0.0.1:{stat} ssl;
        ssl_certificate {tls}/gateway.pem;
        ssl_certificate_key {tls}/gateway.pem;
        proxy_pass {echo};
    }}
    server {{
        listen 127.0.0.1:{name} ssl;
        ssl_certificate {tls}/$gpugate_tls.pem;
        ssl_certificate_key {tls}/$gpugate_tls.pem;
        ssl_certificate_cache max=16 valid=60s;
        gpugate_name_route terminate;
        proxy_pass gpugate;
    }}
    server {{
        listen 127.0.0.1:{var} ssl;
        ssl_certificate {tls}/$gpugate_tls.pem;
        ssl_certificate_key {tls}/$gpugate_tls.pem;
        ssl_certificate_cache max=16 valid=60s;
        proxy_pass {echo};
    }}
"#,
        table = table.display(),
        tls = tls.display(),
    );
    progress("TLS: starting nginx (static, name route, variable certificate)");
    let ng = Nginx::start(&root, &nginx_config(true, &body));
    let mut out = NameRouting {
        clients: cfg.clients,
        rounds: cfg.tls_rounds,
        ms: cfg.tls_ms,
        names: cfg.names,
        ..NameRouting::default()
    };

    // The same server name (one the name route knows) to all three servers.
    let client = TlsClient::new(&config, format!("{bench_id}.jupyter.{DOMAIN}"));
    let ports = [stat, name, var];
    for port in ports {
        // Warm-up, discarded; it also proves each server answers before anything is timed.
        let mut reply = [0u8; 1];
        client.round_trip(port, b"?", &mut reply).unwrap_or_else(|e| panic!("TLS through port {port}: {e}"));
        tls_rate(port, &client, cfg.clients, Duration::from_millis(300));
    }
    let dur = Duration::from_millis(cfg.tls_ms);
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 0..cfg.tls_rounds {
        progress(&format!("TLS connection rate: round {}/{}", round + 1, cfg.tls_rounds));
        // Rotate the order every round so no form always runs first or last.
        for k in 0..3 {
            let i = (round + k) % 3;
            let (rate, f) = tls_rate(ports[i], &client, cfg.clients, dur);
            rates[i].push(rate);
            out.failed[i] += f;
        }
    }
    out.paired = [1, 2].map(|i| paired_ratio(&rates[i], &rates[0]));
    out.spread = rates.each_ref().map(|v| spread(v));
    out.rate = rates.map(|mut v| median(&mut v));

    progress(&format!("TLS: {} name-route activations", cfg.name_activations));
    let (mut ms, mut reference, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.name_activations {
        let id = ids.next_id();
        let fresh = TlsClient::new(&config, format!("{id}.jupyter.{DOMAIN}"));
        let new_route = route(echo, &id, Service::Jupyter);
        // Fail closed before the write: the name has no route yet.
        let mut reply = [0u8; 1];
        out.refused_before += usize::from(fresh.round_trip(name, b"?", &mut reply).is_err());
        let start = Instant::now();
        w.set_host(&new_route).expect("set a name route");
        let (t, attempts) = first_success(&fresh, name, start, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{id}.jupyter.{DOMAIN} never answered after its route was set"));
        ms.push(t.as_secs_f64() * 1e3);
        out.first_try += usize::from(attempts == 1);
        // The same round trip on the now-routed name: the floor for activation.
        let again = Instant::now();
        let (t, _) = first_success(&fresh, name, again, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{id}.jupyter.{DOMAIN} stopped answering"));
        reference.push(t.as_secs_f64() * 1e3);
        over.push(ms[ms.len() - 1] - reference[reference.len() - 1]);
    }
    out.activation = (percentile(&mut ms, 50.0), percentile(&mut ms, 99.0), ms.len());
    out.reference = (percentile(&mut reference, 50.0), percentile(&mut reference, 99.0));
    out.over_floor = (percentile(&mut over, 50.0), percentile(&mut over, 99.0));
    ng.assert_no_crash();
    drop(ng);
    drop(w);
    let _ = std::fs::remove_dir_all(&root);
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl NameRouting {
    /// The report's section, in the columns of the rest of the report.
    pub fn render(&self, o: &mut String) {
        let row = |o: &mut String, what: &str, ours: &str, base: &str, ratio: &str, target: &str| {
            let _ = writeln!(o, "  {what:<34} {ours:>18} {base:>18} {ratio:>10}  {target}");
        };
        let n = |v: f64| format!("{v:.0}");
        let _ = writeln!(o, "\nRouting by TLS server name: one nginx, same echo backend, {} name routes", self.names);
        let _ = writeln!(
            o,
            "  in the table; {} clients, full TLS 1.3 handshake (rustls, certificate verified) + 64-byte",
            self.clients
        );
        let _ = writeln!(
            o,
            "  request and echo + close, {} x {} ms per form, rotated (A B C, B C A, ...); ours/base",
            self.rounds, self.ms
        );
        let _ = writeln!(o, "  is the ratio of the medians (median of the per-round ratios in brackets)");
        let [stat, name, var] = self.rate;
        let ratio = name / stat;
        row(
            o,
            "conn/s, name route (terminate)",
            &n(name),
            &format!("{} static", n(stat)),
            &format!("{ratio:.3}"),
            &format!(">= 0.97  {}  ({:.3})", verdict(ratio >= 0.97), self.paired[0]),
        );
        row(
            o,
            "conn/s, variable certificate only",
            &n(var),
            &format!("{} static", n(stat)),
            &format!("{:.3}", var / stat),
            &format!("the certificate's share ({:.3})", self.paired[1]),
        );
        let r = |(lo, hi): (f64, f64)| format!("{}-{}", n(lo), n(hi));
        let _ = writeln!(
            o,
            "  (min-max of the runs: {} {}, {} {}, {} {})",
            FORMS[0],
            r(self.spread[0]),
            FORMS[1],
            r(self.spread[1]),
            FORMS[2],
            r(self.spread[2])
        );
        if self.failed.iter().any(|&f| f > 0) {
            let _ = writeln!(
                o,
                "  failed connections: {} {}, {} {}, {} {}",
                FORMS[0], self.failed[0], FORMS[1], self.failed[1], FORMS[2], self.failed[2]
            );
        }
        let (p50, p99, count) = self.activation;
        let _ = writeln!(
            o,
            "  name-route activation: Writer::set_host -> first TLS round trip for the new name, n={count}"
        );
        row(o, "p50, ms", &format!("{p50:.3}"), "", "", "");
        row(o, "p99, ms", &format!("{p99:.3}"), "", "", &format!("< 1 ms  {}", verdict(p99 < 1.0)));
        row(
            o,
            "round trip on a routed name",
            &format!("{:.3}/{:.3}", self.reference.0, self.reference.1),
            "",
            "",
            "p50/p99 ms: the floor for activation",
        );
        row(
            o,
            "activation minus its floor",
            &format!("{:.3}/{:.3}", self.over_floor.0, self.over_floor.1),
            "",
            "",
            "p50/p99 ms of the per-activation differences",
        );
        let _ = writeln!(
            o,
            "  {}/{count} activations answered on the first attempt; {}/{count} names refused before their write",
            self.first_try, self.refused_before
        );
    }
}
