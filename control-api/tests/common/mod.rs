//! Test support: a fresh PostgreSQL database per test (from `DATABASE_URL`, which
//! scripts/test.sh exports), a private route table and Docker deployment label, the tiny test
//! image, the API started in-process or as separate processes, and clean-up.
#![allow(dead_code)]

pub mod checker;
pub mod engine;
pub mod pg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpugate_api::app::{self, Mode, Running};
use gpugate_api::config::{Config, GpuMode, PoolConfig};
use gpugate_api::db::Db;
use serde_json::Value;
use sqlx::Connection;

/// The image the tests run.
pub const IMAGE: &str = "gpugate-test/tiny:1";
/// The isolation tests' image: busybox and a real SSH server (dropbear).
pub const ISO_IMAGE: &str = "gpugate-test/iso:1";
/// The real workspace image (`docker/build-images.sh workspace`; `make test` builds it first),
/// for the tests that need its entrypoint and sshd settings.
pub const WORKSPACE_IMAGE: &str = "gpugate/workspace:latest";

/// The superuser URL of the test cluster.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests through scripts/test.sh, or `source scripts/pg.sh; pg_start` first",
    )
}

fn with_db(url: &str, db: &str) -> String {
    let (base, rest) = url.rsplit_once('/').expect("DATABASE_URL has a path");
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("{base}/{db}{query}")
}

/// Builds `image` with `tests/image/<script>` once per machine, if it is missing.
fn ensure_built(image: &str, script: &str) {
    let present = Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("docker CLI available")
        .success();
    if !present {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/image").join(script);
        let ok = Command::new("bash").arg(path).arg(image).status().expect("run the image script").success();
        assert!(ok, "building {image} with {script} failed");
    }
}

/// Builds the test image once per machine if it is missing.
pub fn ensure_image() {
    ensure_built(IMAGE, "build.sh");
}

/// Builds the isolation image once per machine if it is missing.
pub fn ensure_iso_image() {
    ensure_built(ISO_IMAGE, "build-iso.sh");
}

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).expect("rng");
    b.iter().map(|x| format!("{:02x}", x)).collect()
}

/// One test's world.
pub struct Ctx {
    pub name: String,
    /// The superuser URL of the cluster holding this test's database.
    pub admin: String,
    pub db_name: String,
    pub db_url: String,
    pub dir: PathBuf,
    pub table: PathBuf,
    pub deployment: String,
    pub cfg: Config,
    pub running: Option<Running>,
    pub base: String,
    pub http: reqwest::Client,
    pub db: Option<Db>,
    pub children: Vec<Child>,
    pub bases: Vec<String>,
}

impl Ctx {
    /// A fresh database, table path, deployment label and stand-in GPU nodes (indexes 0, 1).
    pub async fn new(name: &str) -> Ctx {
        Ctx::new_on(name, &admin_url()).await
    }

    /// [`Ctx::new`] with the database on the cluster whose superuser URL is `admin` (a test's
    /// own cluster, see [`pg::Cluster`]).
    pub async fn new_on(name: &str, admin: &str) -> Ctx {
        // GPUGATE_LOG=warn (or debug) shows the in-process API's logs with the test's output.
        let filter = tracing_subscriber::EnvFilter::try_from_env("GPUGATE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        ensure_image();
        let suffix = rand_suffix();
        let db_name = format!("gg_{name}_{suffix}");
        let mut conn = sqlx::PgConnection::connect(admin).await.expect("connect to the test cluster");
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\"")).execute(&mut conn).await.expect("create database");
        let dir = std::env::temp_dir().join(format!("gpugate-test-{name}-{suffix}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for i in 0..2 {
            let node = dir.join(format!("nvidia{i}"));
            // Stand-in GPU device nodes: the same device numbers as /dev/null.
            let ok = Command::new("mknod").arg(&node).args(["c", "1", "3"]).status().expect("mknod").success();
            assert!(ok, "mknod {}", node.display());
        }
        let db_url = with_db(admin, &db_name);
        // The writer makes the table's directory itself (0755, whatever the run's umask).
        let table = dir.join("table").join("routes");
        let deployment = format!("t{suffix}");
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            database_url: gpugate_api::config::Secret::new(db_url.clone()),
            database_max_connections: 10,
            route_table: table.clone(),
            deployment: deployment.clone(),
            quarantine_s: 300,
            reconcile_interval_s: 3600,
            route_wait_ms: 3000,
            ..Config::default()
        };
        cfg.docker.default_image = IMAGE.into();
        cfg.docker.allowed_images = vec!["gpugate-test/*".into()];
        // Tests send bursts from one token; the rate-limit test turns it on.
        cfg.rate_limit.per_second = 0.0;
        // Likewise no quotas unless a test sets them.
        cfg.quotas = gpugate_api::config::QuotaConfig { environments: None, gpus: None, running: None };
        cfg.docker.stop_timeout_s = 2;
        // Gauges refresh in the background; tests should not wait the default 5 s for them.
        cfg.metrics.refresh_ms = 200;
        cfg.gpu.devices = vec![0, 1];
        cfg.gpu.mode = GpuMode::Nodes;
        cfg.gpu.node_path = format!("{}/nvidia{{index}}", dir.display());
        cfg.pools.clear();
        for (svc, range) in [("ssh", "20000-20009"), ("jupyter", "21000-21009"), ("code", "22000-22009"), ("rdp", "23000-23009")] {
            cfg.pools.insert(svc.into(), PoolConfig { range: range.parse().expect("range"), bound: None, reserved: vec![] });
        }
        Ctx {
            name: name.into(),
            admin: admin.to_string(),
            db_name,
            db_url,
            dir,
            table,
            deployment,
            cfg,
            running: None,
            base: String::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client"),
            db: None,
            children: vec![],
            bases: vec![],
        }
    }

    /// Starts the API in this process with `self.cfg`.
    pub async fn start(&mut self) {
        self.cfg.validate().expect("test config valid");
        let running = app::start(self.cfg.clone(), Mode::Api { publisher: true }).await.expect("API starts");
        self.base = format!("http://{}", running.addr.expect("addr"));
        self.running = Some(running);
        if self.db.is_none() {
            self.db = Some(Db::connect(&self.cfg).await.expect("db"));
        }
    }

    /// Stops the in-process API.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// The database (after start, or after [`Ctx::connect`]).
    pub fn db(&self) -> &Db {
        self.db.as_ref().expect("started")
    }

    /// Connects and migrates without starting the API.
    pub async fn connect(&mut self) {
        let db = Db::connect(&self.cfg).await.expect("db");
        db.migrate().await.expect("migrate");
        self.db = Some(db);
    }

    /// Creates a user token.
    pub async fn token(&mut self, user: &str, admin: bool) -> String {
        if self.db.is_none() {
            self.connect().await;
        }
        gpugate_api::db::users::create_token(self.db(), user, admin, None).await.expect("token").1
    }

    /// Environment variables that configure a `gpugate-api` child process like `self.cfg`.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let c = &self.cfg;
        let mut env = vec![
            ("DATABASE_URL".to_string(), self.db_url.clone()),
            ("GPUGATE_ROUTE_TABLE".into(), self.table.display().to_string()),
            ("GPUGATE_DEPLOYMENT".into(), self.deployment.clone()),
            ("GPUGATE_QUARANTINE_S".into(), c.quarantine_s.to_string()),
            ("GPUGATE_RECONCILE_INTERVAL_S".into(), c.reconcile_interval_s.to_string()),
            ("GPUGATE_ROUTE_WAIT_MS".into(), c.route_wait_ms.to_string()),
            ("GPUGATE_DEFAULT_IMAGE".into(), IMAGE.into()),
            ("GPUGATE_ALLOWED_IMAGES".into(), c.docker.allowed_images.join(",")),
            ("GPUGATE_RATE_LIMIT_PER_S".into(), c.rate_limit.per_second.to_string()),
            ("GPUGATE_QUOTA_ENVIRONMENTS".into(), quota(c.quotas.environments)),
            ("GPUGATE_QUOTA_GPUS".into(), quota(c.quotas.gpus)),
            ("GPUGATE_QUOTA_RUNNING".into(), quota(c.quotas.running)),
            ("GPUGATE_DOCKER_STOP_TIMEOUT_S".into(), c.docker.stop_timeout_s.to_string()),
            ("GPUGATE_GPUS".into(), c.gpu.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")),
            ("GPUGATE_GPU_MODE".into(), "nodes".into()),
            ("GPUGATE_GPU_NODE_PATH".into(), c.gpu.node_path.clone()),
            ("GPUGATE_DATABASE_MAX_CONNECTIONS".into(), c.database_max_connections.to_string()),
            // GPUGATE_CHILD_LOG (say `info`) shows more of the child processes' logs.
            ("GPUGATE_LOG".into(), std::env::var("GPUGATE_CHILD_LOG").unwrap_or_else(|_| "warn".into())),
            ("GPUGATE_METRICS_REFRESH_MS".into(), c.metrics.refresh_ms.to_string()),
        ];
        for svc in ["ssh", "jupyter", "code", "rdp"] {
            let v = c.pools.get(svc).map(|p| p.range.to_string()).unwrap_or_else(|| "none".into());
            env.push((format!("GPUGATE_POOL_{}", svc.to_uppercase()), v));
        }
        env.push(("GPUGATE_DEFAULT_SERVICES".into(), c.default_services.join(",")));
        env
    }

    /// Runs `gpugate-api <args>` to completion (admin commands) with this test's database;
    /// returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_gpugate-api"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .output()
            .expect("run gpugate-api");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// Spawns `gpugate-api <args>` listening on a free port; returns its index and base URL.
    pub fn spawn(&mut self, args: &[&str], extra_env: &[(&str, &str)]) -> (usize, String) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpugate-api"));
        cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in self.child_env() {
            cmd.env(k, v);
        }
        cmd.env("GPUGATE_LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn gpugate-api");
        self.children.push(child);
        self.bases.push(format!("http://127.0.0.1:{port}"));
        (self.children.len() - 1, format!("http://127.0.0.1:{port}"))
    }

    /// Kills child `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        let c = &mut self.children[i];
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The base URL of child `i`.
    pub fn base_of(&self, i: usize) -> String {
        self.bases[i].clone()
    }

    /// The pid of child `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }

    /// Waits until `base`/healthz answers. A child process serving `base` that exited first
    /// (a refused start: a port taken, a bad setting) fails at once, saying so, rather than
    /// after the whole wait; a time-out says how long the process has been running.
    pub async fn wait_healthy(&self, base: &str) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let pid = self.bases.iter().rposition(|b| b == base).map(|i| self.children[i].id());
        loop {
            if let Ok(r) = self.http.get(format!("{base}/healthz")).timeout(Duration::from_secs(5)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(pid) = pid {
                assert!(!exited(pid), "the process serving {base} (pid {pid}) exited before answering /healthz; its log is above");
            }
            assert!(
                Instant::now() < deadline,
                "{base} did not become healthy within {:?} (pid {pid:?}; the start-up steps it logged at info are above with GPUGATE_CHILD_LOG=info)",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A request with a bearer token; returns (status, envelope).
    pub async fn call(&self, base: &str, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{base}{path}")).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, v)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(&self.base, reqwest::Method::POST, path, token, Some(body)).await
    }
    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(&self.base, reqwest::Method::GET, path, token, None).await
    }
    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(&self.base, reqwest::Method::DELETE, path, token, None).await
    }

    /// The status of environment `id` once it is `want`, or the last one seen after 10 s.
    pub async fn status_within_10s(&self, token: &str, id: &str, want: &str) -> Value {
        let mut status = Value::Null;
        for _ in 0..100 {
            let (_, v) = self.get(&format!("/api/v1/environments/{id}"), token).await;
            status = v["data"]["status"].clone();
            if status == want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        status
    }

    /// `/metrics` of `base` once it holds every line of `want` (the gauges refresh in the
    /// background); panics with the last text after 10 s.
    pub async fn metrics_with(&self, base: &str, want: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = match self.http.get(format!("{base}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            match want.iter().find(|w| !text.contains(**w)) {
                None => return text,
                Some(missing) if Instant::now() >= deadline => panic!("metrics lack {missing}:\n{text}"),
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Ids of this test's containers (running or not).
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=gpugate.deployment={}", self.deployment)])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// Names of this test's home volumes (by label).
    pub fn volumes(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args(["volume", "ls", "-q", "--filter", &format!("label=gpugate.deployment={}", self.deployment)])
            .output()
            .expect("docker volume ls");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// `docker inspect` of a container as JSON.
    pub fn inspect(&self, id: &str) -> Value {
        let out = Command::new("docker").args(["inspect", id]).output().expect("docker inspect");
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
        v[0].clone()
    }

    /// Runs a command in a container; returns stdout.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> String {
        let out = Command::new("docker").arg("exec").arg(id).args(cmd).output().expect("docker exec");
        assert!(out.status.success(), "docker exec {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The route table (read-only).
    pub fn table(&self) -> gpugate_routes::Table {
        gpugate_routes::Table::open_read_only(&self.table).expect("route table exists")
    }

    /// Port rows: (port, service, status, env_id).
    pub async fn port_rows(&self) -> Vec<(i32, String, String, Option<String>)> {
        sqlx::query_as("SELECT port, service, status, env_id FROM port_pool ORDER BY port")
            .fetch_all(self.db().pool())
            .await
            .expect("port rows")
    }

    /// Number of rows of `routes`.
    pub async fn route_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM routes").fetch_one(self.db().pool()).await.expect("routes")
    }

    /// Stops everything and removes the containers, the table and the database.
    pub async fn finish(mut self) {
        self.stop().await;
        self.cleanup_sync();
        if let Some(db) = self.db.take() {
            db.pool().close().await;
        }
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name))
                .execute(&mut admin)
                .await;
        }
    }

    fn cleanup_sync(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f", "-v"]).args(&ids).output();
        }
        // The deployment's home volumes, after the containers that use them.
        let vols = self.volumes();
        if !vols.is_empty() {
            let _ = Command::new("docker").args(["volume", "rm", "-f"]).args(&vols).output();
        }
        // The deployment's workspace networks (made by the API at start; processes starting
        // together may have made two).
        let out = Command::new("docker")
            .args(["network", "ls", "-q", "--filter", &format!("label=gpugate.deployment={}", self.deployment)])
            .output();
        if let Ok(out) = out {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("docker").args(["network", "rm", id]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Ctx {
    // Synchronous clean-up only (children, containers, files) for a test that panicked; the
    // database of a failed test stays for inspection and goes with the throw-away cluster.
    fn drop(&mut self) {
        self.cleanup_sync();
    }
}

/// Whether process `pid` (a child not yet reaped) has exited: gone, or a zombie.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn quota(q: Option<u32>) -> String {
    q.map(|n| n.to_string()).unwrap_or_else(|| "none".into())
}

/// A free loopback TCP port for a child process to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up by default): a port the kernel hands
/// out (`bind(0)`) is free now but may be autobound by any outgoing connection — to PostgreSQL,
/// to Docker — before the child binds it, which made a restarted child fail with "Address
/// already in use". Ports below the range are never autobound; a counter keeps this process's
/// picks apart and the pid keeps concurrent test processes apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 27_000;
    const SPAN: u32 = 5_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(97) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}-{}", FIRST + SPAN - 1);
}

/// Waits for `cond` up to `timeout`; returns whether it held.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The published host address of a container port (from `docker inspect`).
pub fn published(inspect: &Value, container_port: u16) -> SocketAddr {
    let b = &inspect["NetworkSettings"]["Ports"][format!("{container_port}/tcp")][0];
    format!("{}:{}", b["HostIp"].as_str().expect("HostIp"), b["HostPort"].as_str().expect("HostPort"))
        .parse()
        .expect("addr")
}

/// A new ed25519 key pair in the test's directory: (private key path, public key line).
pub fn keypair(ctx: &Ctx) -> (PathBuf, String) {
    let key = ctx.dir.join("id_ed25519");
    let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().expect("ssh-keygen");
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key").trim().to_string();
    (key, public)
}

/// One OpenSSH login as root to `127.0.0.1:port` with `key`, no retry; whether `echo` came
/// back (the client's complaint is printed when not).
pub fn ssh_login(port: u16, key: &Path) -> bool {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args([
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "ConnectionAttempts=1", "-o", "LogLevel=ERROR",
            "-p", &port.to_string(), "root@127.0.0.1", "echo logged-in",
        ])
        .output()
        .expect("ssh client");
    let ok = String::from_utf8_lossy(&out.stdout).contains("logged-in");
    if !ok {
        eprintln!("ssh -p {port}: {}", String::from_utf8_lossy(&out.stderr));
    }
    ok
}

/// The GPU indexes named by `nvidia<N>` entries of a `/dev` listing, sorted.
pub fn nvidia_indexes(listing: &str) -> Vec<u32> {
    let mut out: Vec<u32> = listing.split_whitespace().filter_map(|n| n.strip_prefix("nvidia")?.parse().ok()).collect();
    out.sort_unstable();
    out
}

/// A gateway: our nginx binding the SSH pool `lo`-`hi` on `addr`, reading `table` (the fleet
/// tests run two, on 127.0.0.2 and 127.0.0.3).
pub fn gateway(root: &Path, addr: &str, table: &Path, lo: u16, hi: u16) -> gpugate_tests::Nginx {
    let body = format!(
        r#"
    gpugate_route_table {table};
    upstream gpugate {{ gpugate_balancer; }}
    server {{
        listen {addr}:{lo}-{hi};
        gpugate_route on;
        proxy_connect_timeout 2s;
        proxy_pass gpugate;
    }}
"#,
        table = table.display()
    );
    gpugate_tests::Nginx::start(root, &gpugate_tests::nginx_conf(&body))
}

/// Asserts the real workspace image is there, saying how to build it when not.
pub fn workspace_image_present() {
    let ok = Command::new("docker").args(["image", "inspect", WORKSPACE_IMAGE]).output().expect("docker CLI").status.success();
    assert!(ok, "{WORKSPACE_IMAGE} is missing: docker/build-images.sh workspace builds it (make test does)");
}

/// The running container of environment `id` and its published SSH port.
pub fn container_and_port(ctx: &Ctx, id: &str) -> (String, u16) {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=gpugate.deployment={}", ctx.deployment)])
        .args(["--filter", &format!("label=gpugate.env_id={id}")])
        .output()
        .expect("docker ps");
    let running: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(running.len(), 1, "running containers of {id}: {running:?}");
    let port = published(&ctx.inspect(&running[0]), 22).port();
    (running[0].clone(), port)
}
