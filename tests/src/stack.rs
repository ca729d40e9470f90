//! A private gpugate stack in Docker for end-to-end tests: the compose file's gateway, API and
//! PostgreSQL under their own project name, container names, route directory, database and API
//! ports, with the image's nginx.conf moved onto small private port pools; plus the clients the
//! tests drive through it (curl against the API, OpenSSH through the gateway).
//!
//! Needs the images from `docker/build-images.sh` and `docker-compose`, `curl`, `ssh`, `scp`
//! and `sshpass` on the host. Everything it starts is removed when the `Stack` is dropped (also
//! when a test panics), and any leftover of an earlier run of the same name at start.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Prints one progress line to the real stderr (not captured by the test harness), so the
/// phases and their timings show in `make test`'s output.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {line}");
}

/// Runs a command and returns its output; panics if it cannot be started at all.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its trimmed stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker ARGS...`
pub fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args))
}

/// Port pools of a private stack: `base` .. `base + 99`.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub base: u16,
}

impl Ports {
    /// SSH pool: 50 ports (the churn test cycles through it).
    pub fn ssh(&self) -> (u16, u16) {
        (self.base, self.base + 49)
    }
    pub fn jupyter(&self) -> (u16, u16) {
        (self.base + 50, self.base + 59)
    }
    pub fn code(&self) -> (u16, u16) {
        (self.base + 60, self.base + 69)
    }
    pub fn rdp(&self) -> (u16, u16) {
        (self.base + 70, self.base + 79)
    }
    pub fn api(&self) -> u16 {
        self.base + 80
    }
    pub fn db(&self) -> u16 {
        self.base + 81
    }
    /// The gateway's TLS port (names).
    pub fn tls(&self) -> u16 {
        self.base + 82
    }
}

/// The domain of the stack's names (the compose file's default).
pub const DOMAIN: &str = "gpu.example.com";

/// A running private stack.
pub struct Stack {
    /// Compose project name, container-name prefix and deployment label.
    pub name: String,
    pub ports: Ports,
    /// `http://127.0.0.1:<api port>`
    pub api: String,
    /// An admin API token.
    pub token: String,
    route_dir: PathBuf,
    work: PathBuf,
    env: Vec<(String, String)>,
}

/// The image's nginx.conf with its four `listen <lo>-<hi>;` pools replaced by `pools`, in order
/// (the module routes by port, so which server block holds which pool does not matter).
pub fn nginx_conf_with_pools(conf: &str, pools: &[(u16, u16)]) -> String {
    let mut n = 0;
    let mut out = String::with_capacity(conf.len());
    for line in conf.lines() {
        let t = line.trim();
        let is_pool = t.strip_prefix("listen ").and_then(|r| r.strip_suffix(';')).is_some_and(|r| {
            r.split_once('-').is_some_and(|(a, b)| a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok())
        });
        if is_pool && n < pools.len() {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}listen {}-{};\n", pools[n].0, pools[n].1));
            n += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(n, pools.len(), "nginx.conf has {n} pool listens, expected {}", pools.len());
    out
}

impl Stack {
    /// The development CA the stack's gateway certificate is signed by.
    pub fn ca(&self) -> PathBuf {
        self.work.join("tls/ca.crt")
    }

    /// `curl`s `https://<id>.<service>.<domain>:<tls port><path>` through the gateway's TLS
    /// port, trusting the stack's CA and resolving the name to 127.0.0.1 (as DNS would);
    /// returns (HTTP status, body), status 0 when no answer came.
    pub fn https(&self, id: &str, service: &str, path: &str) -> (u16, String) {
        let host = format!("{id}.{service}.{DOMAIN}");
        let tls = self.ports.tls();
        let out = run(Command::new("curl")
            .args(["-sS", "-m", "20", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.ca())
            .arg("--resolve")
            .arg(format!("{host}:{tls}:127.0.0.1"))
            .arg(format!("https://{host}:{tls}{path}")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Starts a stack named `<prefix>-<pid>` on the first block of 100 ports from `bases`
    /// whose ports are all free (several test runs may share a machine), after removing the
    /// stacks of earlier runs of `prefix` whose process is gone; waits until `/readyz` is ready.
    pub fn start_private(prefix: &str, bases: &[u16]) -> Stack {
        remove_orphans(prefix);
        let base = bases
            .iter()
            .copied()
            .find(|&b| (b..b + 100).all(port_free))
            .unwrap_or_else(|| panic!("no free block of 100 ports at {bases:?}"));
        Stack::start(&format!("{prefix}-{}", std::process::id()), base)
    }

    /// Starts the stack `name` on pools `base`..`base + 99` and waits until `/readyz` is ready.
    pub fn start(name: &str, base: u16) -> Stack {
        for image in ["gpugate/gateway", "gpugate/api", "gpugate/postgres", "gpugate/workspace"] {
            assert!(
                docker(&["image", "inspect", image]).status.success(),
                "image {image} is missing: run docker/build-images.sh (scripts/test.sh does)"
            );
        }
        let ports = Ports { base };
        let work = crate::temp_dir(name);
        let conf = std::fs::read_to_string(repo_root().join("nginx-conf/nginx.conf")).expect("read nginx.conf");
        let conf = nginx_conf_with_pools(&conf, &[ports.ssh(), ports.jupyter(), ports.code(), ports.rdp()]);
        assert!(conf.contains("listen 8443 ssl;"), "nginx.conf has no TLS server on 8443");
        let conf = conf.replace("listen 8443 ssl;", &format!("listen {} ssl;", ports.tls()));
        std::fs::write(work.join("nginx.conf"), conf).expect("write nginx.conf");
        // The development TLS material `make up` makes, for the stack's TLS port.
        let tls = crate::dev_tls(&work, DOMAIN);
        std::fs::write(
            work.join("override.yaml"),
            format!(
                "version: \"2.4\"\nservices:\n  gateway:\n    volumes:\n      - {}:/usr/local/nginx/conf/nginx.conf:ro\n",
                work.join("nginx.conf").display()
            ),
        )
        .expect("write override");
        let range = |(a, b): (u16, u16)| format!("{a}-{b}");
        let route_dir = PathBuf::from(format!("/dev/shm/{name}"));
        let env: Vec<(String, String)> = [
            ("GPUGATE_STACK", name.to_string()),
            ("GPUGATE_DEPLOYMENT", name.to_string()),
            ("GPUGATE_ROUTE_DIR", route_dir.display().to_string()),
            ("GPUGATE_DB_PORT", ports.db().to_string()),
            ("GPUGATE_DB_PASSWORD", format!("{name}-db")),
            ("GPUGATE_API_LISTEN", format!("127.0.0.1:{}", ports.api())),
            ("GPUGATE_QUARANTINE_S", "1".to_string()),
            // The idle phase waits for the idle task: look every second.
            ("GPUGATE_IDLE_CHECK_INTERVAL_S", "1".to_string()),
            // /metrics serves gauges refreshed in the background; keep them fresh for the checks.
            ("GPUGATE_METRICS_REFRESH_MS", "500".to_string()),
            ("GPUGATE_POOL_SSH", range(ports.ssh())),
            ("GPUGATE_POOL_JUPYTER", range(ports.jupyter())),
            ("GPUGATE_POOL_CODE", range(ports.code())),
            ("GPUGATE_POOL_RDP", range(ports.rdp())),
            ("GPUGATE_TLS_PORT", ports.tls().to_string()),
            ("GPUGATE_TLS_DIR", tls.display().to_string()),
            ("GPUGATE_DOMAIN", DOMAIN.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut stack = Stack {
            name: name.to_string(),
            ports,
            api: format!("http://127.0.0.1:{}", ports.api()),
            token: String::new(),
            route_dir,
            work,
            env,
        };
        stack.remove_all(); // leftovers of an earlier run that could not clean up
        let out = stack.compose(&["up", "-d"]);
        assert!(out.status.success(), "docker-compose up: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stack.wait_ready(Duration::from_secs(90)), "the API is not ready: {}", stack.api_logs());
        let token = run_ok(Command::new("docker").args([
            "exec",
            &stack.container("api"),
            "gpugate-api",
            "token",
            "create",
            "--user",
            "e2e",
            "--admin",
        ]));
        stack.token = token.lines().last().unwrap_or_default().to_string();
        assert!(!stack.token.is_empty(), "no token printed");
        stack
    }

    /// `docker-compose -p NAME -f compose.yaml -f override.yaml ARGS...` with the stack's variables.
    pub fn compose(&self, args: &[&str]) -> Output {
        run(Command::new("docker-compose")
            .args(["-p", &self.name, "-f"])
            .arg(repo_root().join("docker/compose.yaml"))
            .arg("-f")
            .arg(self.work.join("override.yaml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
    }

    /// Container name of a compose service (`gateway`, `api`, `postgres`).
    pub fn container(&self, service: &str) -> String {
        format!("{}-{service}", self.name)
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        self.call("GET", "/readyz", None).0 == 200
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    /// The last lines of the API's log (for failure messages).
    pub fn api_logs(&self) -> String {
        let out = docker(&["logs", "--tail", "30", &self.container("api")]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// One API request with curl: (HTTP status, parsed body or Null). Status 0: no answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        // Long enough for a create or start with `wait: ready` (the readiness deadlines).
        cmd.args(["-sS", "-m", "240", "-w", "\n%{http_code}", "-X", method])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = run(cmd.arg(format!("{}{path}", self.api)));
        let text = String::from_utf8_lossy(&out.stdout);
        let (json, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), serde_json::from_str(json).unwrap_or(Value::Null))
    }

    /// Creates a workspace (`body` is the JSON request); returns the response's `data`.
    pub fn create(&self, body: &Value) -> Value {
        let (status, v) = self.call("POST", "/api/v1/environments", Some(&body.to_string()));
        assert_eq!(status, 201, "create answered {status}: {v}\n{}", self.api_logs());
        v["data"].clone()
    }

    /// Deletes a workspace; asserts the API accepted it.
    pub fn delete(&self, id: &str) {
        let (status, v) = self.call("DELETE", &format!("/api/v1/environments/{id}"), None);
        assert!(status == 200 || status == 204, "delete {id} answered {status}: {v}");
    }

    /// Ids of this stack's workspace containers that carry `gpugate.env_id=<id>` (any id: None).
    pub fn containers(&self, env_id: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "ps".to_string(),
            "-aq".to_string(),
            "--filter".to_string(),
            format!("label=gpugate.deployment={}", self.name),
        ];
        if let Some(id) = env_id {
            args.extend(["--filter".to_string(), format!("label=gpugate.env_id={id}")]);
        }
        let out = run(Command::new("docker").args(&args));
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
    }

    /// The gateway's nginx master (the container's init process, seen from the host: the
    /// gateway shares the host's network but not its pid namespace) and its workers.
    pub fn gateway_pids(&self) -> (u32, Vec<u32>) {
        let pid = run_ok(Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", &self.container("gateway")]));
        let pid: u32 = pid.parse().unwrap_or_else(|_| panic!("gateway pid {pid:?}"));
        (pid, crate::children_of(pid))
    }

    /// A value of the API's Prometheus metrics, by its full series text
    /// (e.g. `gpugate_ports{service="ssh",state="allocated"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let out = run(Command::new("curl").args(["-sS", "-m", "10"]).arg(format!("{}/metrics", self.api)));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    fn remove_all(&self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "3"]);
        let ids = self.containers(None);
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let _ = std::fs::remove_dir_all(&self.route_dir);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let t = Instant::now();
        self.remove_all();
        let _ = std::fs::remove_dir_all(&self.work);
        report(&format!("stack {} removed in {:.1} s", self.name, t.elapsed().as_secs_f64()));
    }
}

/// Whether `port` can be bound on every address (the gateway binds pools on all of them).
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Removes the stacks `<prefix>-<pid>` (containers, network, volume, workspaces, route
/// directory) whose test process no longer runs: what a killed run left behind.
fn remove_orphans(prefix: &str) {
    let out = docker(&["ps", "-a", "--filter", &format!("name={prefix}-"), "--format", "{{.Names}}"]);
    let mut projects: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|n| {
            let rest = n.strip_prefix(&format!("{prefix}-"))?;
            let (pid, _service) = rest.split_once('-')?;
            let pid: u32 = pid.parse().ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| format!("{prefix}-{pid}"))
        })
        .collect();
    projects.sort();
    projects.dedup();
    for p in projects {
        report(&format!("removing {p}, left behind by an earlier run"));
        let _ = run(Command::new("docker-compose")
            .args(["-p", &p, "-f"])
            .arg(repo_root().join("docker/compose.yaml"))
            .args(["down", "-v", "--remove-orphans", "-t", "1"]));
        let ws = docker(&["ps", "-aq", "--filter", &format!("label=gpugate.deployment={p}")]);
        for id in String::from_utf8_lossy(&ws.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", "-v", id]);
        }
        let _ = std::fs::remove_dir_all(format!("/dev/shm/{p}"));
    }
}

/// Options every OpenSSH client call here uses: no host-key prompts or files, fail fast.
pub fn ssh_opts() -> Vec<String> {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "ServerAliveInterval=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// How the OpenSSH client logs in.
#[derive(Clone, Debug)]
pub enum Login {
    /// With this password, through sshpass (`SSHPASS` in the environment, not the command line).
    Password(String),
    /// With this private key file.
    Key(PathBuf),
}

/// `ssh`/`scp` (`program`) through the gateway with `login`; add the remaining arguments.
pub fn ssh_command(program: &str, login: &Login) -> Command {
    let mut cmd = match login {
        Login::Password(p) => {
            let mut c = Command::new("sshpass");
            c.arg("-e").arg(program).env("SSHPASS", p);
            c.args(ssh_opts()).args(["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]);
            c
        }
        Login::Key(k) => {
            let mut c = Command::new(program);
            c.args(ssh_opts()).args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"]).arg(k);
            c
        }
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `remote` over `ssh -p port remotegpu@127.0.0.1`; Ok(stdout) on success.
pub fn ssh_run(port: u16, login: &Login, remote: &str) -> Result<String, String> {
    let out = run(ssh_command("ssh", login).arg("-p").arg(port.to_string()).arg("remotegpu@127.0.0.1").arg(remote));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("ssh -p {port} {remote:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Like `ssh_run`, retried for up to `timeout` (the API answers before sshd listens).
pub fn ssh_run_retry(port: u16, login: &Login, remote: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match ssh_run(port, login, remote) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Whether the gateway turns a connection on `port` away: accepted (the pool is bound) and
/// closed at once without the SSH server's banner, or refused outright.
pub fn port_refuses(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)) else {
        return true;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut s, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        // A timeout is a live upstream that has not spoken yet; a reset is a refusal.
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// An interactive SSH session kept open through the gateway: a remote shell loop that echoes
/// each line back with its hostname, driven over the client's stdin/stdout.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Session {
    /// Opens the session (retrying until sshd answers, up to `timeout`).
    pub fn open(port: u16, login: &Login, timeout: Duration) -> Result<Session, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut child = ssh_command("ssh", login)
                .arg("-p")
                .arg(port.to_string())
                .arg("remotegpu@127.0.0.1")
                .arg("while read -r l; do echo \"$(hostname):$l\"; done")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn ssh: {e}"))?;
            let stdin = child.stdin.take().ok_or("no stdin")?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut s = Session { child, stdin, lines: rx };
            match s.round_trip("hello", Duration::from_secs(10)) {
                Ok(_) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends `line`, waits for the echo; Ok("<hostname>:<line>").
    pub fn round_trip(&mut self, line: &str, timeout: Duration) -> Result<String, String> {
        writeln!(self.stdin, "{line}").map_err(|e| format!("session write: {e}"))?;
        self.stdin.flush().map_err(|e| format!("session flush: {e}"))?;
        let got = self.lines.recv_timeout(timeout).map_err(|e| format!("session read ({line}): {e}"))?;
        if got.ends_with(&format!(":{line}")) {
            Ok(got)
        } else {
            Err(format!("session answered {got:?} to {line:?}"))
        }
    }
}

impl Session {
    /// Waits up to `timeout` for the connection to end (the client exits when the gateway
    /// closes it); whether it did.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        crate::wait_until(timeout, || {
            std::thread::sleep(Duration::from_millis(20));
            matches!(self.child.try_wait(), Ok(Some(_)))
        })
    }
}

/// A websocket opened through the gateway with a plain HTTP/1.1 upgrade: enough to hold a
/// session open and see when it is closed.
pub struct WebSocket {
    stream: TcpStream,
}

impl WebSocket {
    /// Upgrades `GET path` on `127.0.0.1:port`; Err with the answer's first line unless 101.
    pub fn open(port: u16, path: &str) -> Result<WebSocket, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect {port}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: Z3B1Z2F0ZS1lMmUtd3Mtaw==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).map_err(|e| format!("upgrade request: {e}"))?;
        // Read the answer's head byte by byte, so no frame after it is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match std::io::Read::read(&mut stream, &mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => return Err(format!("closed during the upgrade after {:?}", String::from_utf8_lossy(&head))),
                Err(e) => return Err(format!("upgrade answer: {e}")),
            }
            if head.len() > 16384 {
                return Err("upgrade answer head over 16 KiB".into());
            }
        }
        let head = String::from_utf8_lossy(&head);
        let first = head.lines().next().unwrap_or_default();
        if !first.contains(" 101 ") {
            return Err(format!("no upgrade: {first}"));
        }
        Ok(WebSocket { stream })
    }

    /// Waits up to `timeout` for the peer to close the connection (frames it sends meanwhile
    /// are read and dropped); whether it did.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(Duration::from_millis(50)));
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match std::io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
