//! Test support for gpugate's nginx tests: our real nginx with the module loaded, real TCP
//! backends, and the route-table writer, all on loopback.
//!
//! `GPUGATE_DIST` names the `make build` output (default: `dist/` at the workspace root).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use gpugate_routes::{EnvId, LockMode, Route, Service, Table, Writer};

pub mod client;
pub mod host_identity;
pub mod ssh;
pub mod stack;

/// The `make build` output folder.
pub fn dist() -> PathBuf {
    match std::env::var_os("GPUGATE_DIST") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist"),
    }
}

/// A fresh directory under the system temp dir, readable by nginx's worker user.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gpugate-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    chmod(&dir, 0o755);
    dir
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The development TLS material `make up` makes (`scripts/tls-dev.sh`: `ca.crt`, and
/// `gateway.pem` for `*.{ssh,jupyter,code,rdp}.<domain>`, readable by nginx's workers), made
/// in `<root>/tls`; returns that folder.
pub fn dev_tls(root: &Path, domain: &str) -> PathBuf {
    let tls = root.join("tls");
    let out = Command::new(stack::repo_root().join("scripts/tls-dev.sh"))
        .arg(&tls)
        .arg(domain)
        .arg("nogroup")
        .output()
        .expect("run scripts/tls-dev.sh");
    assert!(out.status.success(), "tls-dev.sh: {}", String::from_utf8_lossy(&out.stderr));
    tls
}

/// A directory for the route table, the operator recipe from the README: owned by the writer
/// (root here) and writable by no one else, group nogroup and setgid so the counters file
/// inherits the group of nginx's workers (nobody:nogroup), who may write counters but not
/// routes.
pub fn table_dir(root: &Path) -> PathBuf {
    let dir = root.join("table");
    std::fs::create_dir_all(&dir).expect("create table dir");
    let ok = Command::new("chgrp").arg("nogroup").arg(&dir).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "chgrp nogroup {}", dir.display());
    chmod(&dir, 0o2755);
    dir
}

/// The ways a server proxies to the route (both are documented).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyForm {
    /// `upstream gpugate { gpugate_balancer; }` + `proxy_pass gpugate;`
    Balancer,
    /// `proxy_pass $gpugate_upstream;`
    Variable,
}

/// A running nginx (our build, the module loaded) in its own prefix.
pub struct Nginx {
    pub prefix: PathBuf,
    pub conf: PathBuf,
    stopped: bool,
}

/// The `stream {}` body for a routed pool `lo..=hi` on 127.0.0.1.
pub fn routed_stream(table: &Path, lo: u16, hi: u16, form: ProxyForm) -> String {
    let proxy = match form {
        ProxyForm::Balancer => "proxy_pass gpugate;",
        ProxyForm::Variable => "proxy_pass $gpugate_upstream;",
    };
    format!(
        r#"
    log_format gpugate '$server_port $gpugate_route_status env=$gpugate_env_id svc=$gpugate_service up=$gpugate_upstream $status';
    access_log logs/access.log gpugate;
    gpugate_route_table {table};
    upstream gpugate {{ gpugate_balancer; }}
    server {{
        listen 127.0.0.1:{lo}-{hi};
        gpugate_route on;
        proxy_connect_timeout 2s;
        {proxy}
    }}
"#,
        table = table.display()
    )
}

/// Process settings of a test nginx.conf.
#[derive(Clone, Copy, Debug)]
pub struct ConfOptions {
    /// Whether to `load_module` ours (a baseline nginx runs without it).
    pub load_module: bool,
    /// `worker_connections`; every listening socket counts against it.
    pub worker_connections: u32,
    /// `worker_rlimit_nofile`; must stay under the hard limit of the machine.
    pub rlimit_nofile: u32,
}

impl Default for ConfOptions {
    fn default() -> Self {
        ConfOptions { load_module: true, worker_connections: 8192, rlimit_nofile: 16384 }
    }
}

/// A whole nginx.conf around a `stream {}` body, with the default options.
pub fn nginx_conf(stream_body: &str) -> String {
    nginx_conf_with(stream_body, ConfOptions::default())
}

/// A whole nginx.conf around a `stream {}` body.
pub fn nginx_conf_with(stream_body: &str, opts: ConfOptions) -> String {
    let load = if opts.load_module {
        format!("load_module {};\n", dist().join("modules/ngx_stream_gpugate_module.so").display())
    } else {
        String::new()
    };
    format!(
        r#"{load}user nobody nogroup;
worker_processes 2;
worker_rlimit_nofile {rlimit};
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections {conns}; }}
stream {{
{stream_body}
}}
"#,
        rlimit = opts.rlimit_nofile,
        conns = opts.worker_connections,
    )
}

impl Nginx {
    fn prepare(root: &Path, conf_text: &str) -> (PathBuf, PathBuf) {
        let prefix = root.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).expect("create nginx prefix");
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, conf_text).expect("write nginx.conf");
        (prefix, conf)
    }

    /// `nginx -t` on a configuration; returns its output.
    pub fn test_config(root: &Path, conf_text: &str) -> Output {
        let (prefix, conf) = Nginx::prepare(root, conf_text);
        Command::new(dist().join("sbin/nginx"))
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-t")
            .output()
            .expect("run nginx -t")
    }

    /// Starts nginx (daemonised) and waits until its workers are up.
    pub fn start(root: &Path, conf_text: &str) -> Nginx {
        let (prefix, conf) = Nginx::prepare(root, conf_text);
        let out = Command::new(dist().join("sbin/nginx"))
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("run nginx");
        assert!(
            out.status.success(),
            "nginx failed to start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ng = Nginx { prefix, conf, stopped: false };
        let deadline = Instant::now() + Duration::from_secs(10);
        while ng.worker_pids().len() < 2 {
            assert!(Instant::now() < deadline, "nginx workers did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ng
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.prefix.join("logs/nginx.pid")).expect("pid file");
        text.trim().parse().expect("pid")
    }

    /// The workers' pids, sorted.
    pub fn worker_pids(&self) -> Vec<u32> {
        let Ok(text) = std::fs::read_to_string(self.prefix.join("logs/nginx.pid")) else {
            return Vec::new();
        };
        let Ok(master) = text.trim().parse::<u32>() else { return Vec::new() };
        children_of(master)
    }

    /// Kills worker `victim` with SIGKILL and waits until the master has replaced it (as many
    /// workers as before, the victim not among them); whether it did within 5 s.
    pub fn kill_worker(&self, victim: u32) -> bool {
        let count = self.worker_pids().len();
        // SAFETY: kill(2) on a pid of the nginx this test started.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        wait_until(Duration::from_secs(5), || {
            let now = self.worker_pids();
            now.len() == count && !now.contains(&victim)
        })
    }

    /// Master and worker pids together: unchanged means no reload and no crash.
    pub fn pids(&self) -> (u32, Vec<u32>) {
        (self.master_pid(), self.worker_pids())
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/error.log")).unwrap_or_default()
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/access.log")).unwrap_or_default()
    }

    /// Asserts the error log shows no crashed worker.
    pub fn assert_no_crash(&self) {
        let log = self.error_log();
        for bad in ["exited on signal", "[alert]", "[emerg]", "[crit]"] {
            assert!(!log.contains(bad), "nginx error log has {bad:?}:\n{log}");
        }
    }

    /// Forgets an nginx that is already gone (killed by the test), so dropping it stops nothing.
    pub fn forget(&mut self) {
        self.stopped = true;
    }

    /// Stops nginx and waits for the master to exit.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let master = self.master_pid();
        let _ = Command::new(dist().join("sbin/nginx"))
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{master}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pids of the direct children of `pid`, sorted.
pub fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let mut v: Vec<u32> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A TCP backend on loopback that greets each connection with `<name>\n`, then echoes each
/// line back prefixed with `<name>:`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds `bind` (e.g. "127.0.0.1:0" or "[::1]:0") and serves until dropped.
    pub fn start(name: &str, bind: &str) -> Backend {
        let listener = TcpListener::bind(bind).expect("bind backend");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (name.to_owned(), stop.clone());
        let thread = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(conn) = conn {
                        let n = n.clone();
                        let _ = std::thread::Builder::new()
                            .stack_size(128 << 10)
                            .spawn(move || serve(conn, &n));
                    }
                }
            })
            .expect("spawn backend");
        Backend { name: name.to_owned(), addr, stop, thread: Some(thread) }
    }
}

fn serve(mut conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                for &b in &buf[..n] {
                    line.push(b);
                    if b == b'\n' {
                        let mut reply = format!("{name}:").into_bytes();
                        reply.extend_from_slice(&line);
                        if conn.write_all(&reply).is_err() {
                            return;
                        }
                        line.clear();
                    }
                }
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a client saw when it connected to a gateway port.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The greeting line of the backend it reached.
    Backend(String),
    /// The connection was closed (or reset) without a byte: refused by the gateway.
    Refused,
}

/// Connects to 127.0.0.1:`port` and reads the backend's greeting (or the close).
pub fn probe(port: u16) -> Seen {
    match Client::connect(port) {
        Ok(mut c) => match c.read_line() {
            Some(line) => Seen::Backend(line),
            None => Seen::Refused,
        },
        Err(_) => Seen::Refused,
    }
}

/// A line-oriented client connection through the gateway.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Client { stream, buf: Vec::new() })
    }

    /// Reads one line (without the newline); `None` on close, reset or time-out.
    pub fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a line and returns the echoed reply.
    pub fn round_trip(&mut self, line: &str) -> Option<String> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        self.read_line()
    }
}

/// A route to `upstream` for environment `env`.
pub fn route(upstream: SocketAddr, env: &str, service: Service) -> Route {
    Route {
        upstream,
        env_id: env.parse().expect("env id"),
        service,
        generation: 1,
        expires_ms: None,
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
