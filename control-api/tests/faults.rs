//! The randomized fault test: a whole fleet on one machine — two API processes, two gateways
//! (our nginx on 127.0.0.2 and 127.0.0.3, each fed by its own `gpugate-api publish`), two
//! Docker engines (the machine's, and a second `dockerd` reached over TCP with mutual TLS as a
//! remote GPU host is), the test's own PostgreSQL cluster — and several users creating,
//! stopping, starting, deleting and closing sessions while faults are injected at random: an
//! API process killed with SIGKILL, its liveness connection terminated, PostgreSQL restarted,
//! the remote engine frozen past `fail_after_s`, a publisher killed. After every fault and at
//! the end (after convergence), the invariant checker (`common/checker.rs`) looks from outside,
//! and an SSH session into a workspace no fault touches must still be alive.
//!
//! The seed is printed at the start; `GPUGATE_FAULT_SEED=<n>` replays the same faults and the
//! same user choices (the interleaving with the processes is the machine's).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::checker::{is_hard, Checker, EngineView, GatewayView};
use common::engine::Engine;
use common::pg::Cluster;
use common::{Ctx, ISO_IMAGE};
use serde_json::{json, Value};

/// The SSH pool both gateways bind.
const POOL: (u16, u16) = (24200, 24279);
/// Seconds a host may be silent before its workspaces fail.
const FAIL_AFTER_S: u64 = 6;
/// The fault phase's length; setup and convergence come on top (the whole test stays under
/// five minutes).
const FAULT_PHASE: Duration = Duration::from_secs(130);
/// How long a check waits for a violation to clear before it counts.
const SETTLE: Duration = Duration::from_secs(20);

/// splitmix64: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillApi,
    TerminateLiveness,
    RestartPostgres,
    FreezeEngine,
    KillPublisher,
}

const FAULTS: [Fault; 5] =
    [Fault::KillApi, Fault::TerminateLiveness, Fault::RestartPostgres, Fault::FreezeEngine, Fault::KillPublisher];

/// The processes of the fleet, by role: child indexes in `Ctx::children`.
struct Procs {
    apis: [usize; 2],
    publishers: [usize; 2],
}

/// Shared between the fault loop and the user tasks.
struct Shared {
    /// The API processes' base URLs (a restarted one gets a new port).
    bases: Mutex<Vec<String>>,
    paused: AtomicBool,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    /// Answers a user would call a bug (5xx other than 503, a failed workspace that cannot be
    /// started again), with what was asked.
    errors: Mutex<Vec<String>>,
    ops: AtomicU64,
    /// (operation, answer) → how often: what the users saw.
    tally: Mutex<std::collections::BTreeMap<String, u32>>,
}

/// A long-lived SSH session printing a tick a second; `last` is when the last one came.
struct Session {
    child: Child,
    last: Arc<Mutex<Instant>>,
    what: String,
}

impl Session {
    fn open(addr: &str, port: u16, key: &Path) -> Session {
        let mut child = Command::new("ssh")
            .arg("-i")
            .arg(key)
            .args([
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=0",
                "-p", &port.to_string(), &format!("root@{addr}"), "while true; do echo tick; sleep 1; done",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh client");
        let last = Arc::new(Mutex::new(Instant::now() - Duration::from_secs(3600)));
        let out = child.stdout.take().expect("stdout");
        let seen = last.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) if l == "tick" => *seen.lock().expect("lock") = Instant::now(),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Session { child, last, what: format!("ssh via {addr}:{port}") }
    }

    /// Whether a tick came within the last `within`.
    fn alive(&mut self, within: Duration) -> bool {
        let exited = matches!(self.child.try_wait(), Ok(Some(_)));
        !exited && self.last.lock().expect("lock").elapsed() < within
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Directories removed when dropped, also when the test panicked.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn elapsed(t0: Instant) -> String {
    format!("[{:6.1}s]", t0.elapsed().as_secs_f64())
}

/// One request; `None` when no answer came (the process is down).
async fn call(http: &reqwest::Client, base: &str, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> Option<(u16, Value)> {
    let mut req = http.request(method, format!("{base}{path}")).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.ok()?;
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    Some((status, v))
}

/// A user: picks an operation at random on one of their workspaces (at most three), through
/// either API process, until told to stop; pauses while the checker looks.
async fn user(shared: Arc<Shared>, http: reqwest::Client, token: String, name: String, seed: u64, key: String) {
    let mut rng = Rng(seed);
    let mut mine: Vec<String> = vec![];
    let mut n = 0u32;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let base = {
            let b = shared.bases.lock().expect("lock");
            b[rng.below(b.len() as u64) as usize].clone()
        };
        let pick = rng.below(10);
        let target = (!mine.is_empty()).then(|| mine[rng.below(mine.len() as u64) as usize].clone());
        let (what, answer) = match (pick, target) {
            (0..=2, _) | (_, None) if mine.len() < 3 => {
                n += 1;
                let body = json!({"name": format!("{name}-{n}"), "gpus": rng.below(2), "ssh_public_keys": [key.clone()]});
                let a = call(&http, &base, reqwest::Method::POST, "/api/v1/environments", &token, Some(body)).await;
                if let Some((201, v)) = &a {
                    if let Some(id) = v["data"]["id"].as_str() {
                        mine.push(id.to_string());
                    }
                }
                ("create".to_string(), a)
            }
            (_, None) => ("nothing".to_string(), Some((200, Value::Null))),
            (3..=4, Some(id)) => {
                let a = call(&http, &base, reqwest::Method::POST, &format!("/api/v1/environments/{id}/stop"), &token, None).await;
                (format!("stop {id}"), a)
            }
            (5..=6, Some(id)) => {
                let a = call(&http, &base, reqwest::Method::POST, &format!("/api/v1/environments/{id}/start"), &token, None).await;
                // A refused start of a workspace that failed (its host was lost for a while) is
                // data its owner cannot reach: failed must be recoverable (invariant 11).
                if let Some((409, refusal)) = &a {
                    let now = call(&http, &base, reqwest::Method::GET, &format!("/api/v1/environments/{id}"), &token, None).await;
                    if let Some((200, v)) = now {
                        if v["data"]["status"] == "failed" {
                            shared.errors.lock().expect("lock").push(format!(
                                "{name}: start of failed environment {id} ({}) refused: {refusal}",
                                v["data"]["status_reason"]
                            ));
                        }
                    }
                }
                (format!("start {id}"), a)
            }
            (7, Some(id)) => {
                let a = call(&http, &base, reqwest::Method::POST, &format!("/api/v1/environments/{id}/sessions/close"), &token, None).await;
                (format!("close sessions {id}"), a)
            }
            (_, Some(id)) => {
                let a = call(&http, &base, reqwest::Method::DELETE, &format!("/api/v1/environments/{id}"), &token, None).await;
                if matches!(&a, Some((200 | 404, _))) {
                    mine.retain(|m| m != &id);
                }
                (format!("delete {id}"), a)
            }
        };
        let verb = what.split(' ').next().unwrap_or("").to_string();
        let code = answer.as_ref().map(|(s, _)| s.to_string()).unwrap_or_else(|| "no answer".into());
        *shared.tally.lock().expect("lock").entry(format!("{verb} {code}")).or_default() += 1;
        if let Some((s, v)) = &answer {
            if *s >= 500 && *s != 503 {
                shared.errors.lock().expect("lock").push(format!("{name}: {what} via {base} answered {s}: {v}"));
            }
        }
        shared.ops.fetch_add(1, Ordering::SeqCst);
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
    }
}

/// Waits until `host`'s health (admin view) is `want`, up to `timeout`.
async fn wait_health(ctx: &Ctx, admin: &str, host: &str, want: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some((200, v)) = call(&ctx.http, &ctx.base, reqwest::Method::GET, "/api/v1/admin/hosts", admin, None).await {
            let h = v["data"]["hosts"].as_array().and_then(|hs| hs.iter().find(|h| h["name"] == host).cloned());
            if h.is_some_and(|h| h["health"] == want) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Terminates the backend holding one API process's liveness lock (`which` picks among the
/// holders); says what it did.
async fn terminate_liveness(ctx: &Ctx, which: usize) -> String {
    // The liveness locks are the two-key advisory locks in the instance space (db/mod.rs).
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = $1::oid AND granted ORDER BY pid",
    )
    .bind(0x6770_7567_i64)
    .fetch_all(ctx.db().pool())
    .await
    .unwrap_or_default();
    match pids.get(which % pids.len().max(1)) {
        Some(pid) => {
            let _: Option<bool> =
                sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_optional(ctx.db().pool()).await.unwrap_or(None);
            format!("pg_terminate_backend({pid}) of a liveness lock (holders {pids:?})")
        }
        None => "pg_terminate_backend: no liveness lock held".to_string(),
    }
}

/// Whether `base`/healthz answers within `timeout`.
async fn healthy_within(ctx: &Ctx, base: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = ctx.http.get(format!("{base}/healthz")).timeout(Duration::from_secs(5)).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Checks until clean or `SETTLE` passed; returns the violations of the last look.
async fn settle(checker: &Checker, converged: bool, frozen: &BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let v = match checker.snapshot().await {
            Ok(s) => checker.violations(&s, converged, frozen),
            Err(e) => vec![format!("the checker could not read the database: {e}")],
        };
        if v.is_empty() || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_faults_keep_every_invariant() {
    let t0 = Instant::now();
    let seed = match std::env::var("GPUGATE_FAULT_SEED") {
        Ok(s) => s.trim().parse::<u64>().expect("GPUGATE_FAULT_SEED is a number"),
        Err(_) => {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).expect("rng");
            u64::from_le_bytes(b) % 1_000_000_000
        }
    };
    eprintln!("fault test seed {seed} (replay with GPUGATE_FAULT_SEED={seed})");
    let mut rng = Rng(seed);
    common::ensure_iso_image();

    // The test's own PostgreSQL: restarting it must not touch the cluster of other tests.
    let mut cluster = Cluster::start();
    let mut ctx = Ctx::new_on("faults", &cluster.url()).await;
    ctx.cfg.docker.default_image = ISO_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![ISO_IMAGE.into()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.pools.get_mut("ssh").expect("ssh pool").range = format!("{}-{}", POOL.0, POOL.1).parse().expect("range");
    // Ports come back after 30 s rather than 300: the users create about a workspace a second
    // and the pool must not run dry halfway (the checker sees a port re-used too early as a
    // route to the wrong environment, whatever the quarantine).
    ctx.cfg.quarantine_s = 30;
    ctx.cfg.reconcile_interval_s = 3;
    ctx.cfg.route_wait_ms = 2000;
    ctx.cfg.fleet.probe_interval_s = 1;
    ctx.cfg.fleet.fail_after_s = FAIL_AFTER_S;
    ctx.cfg.docker.call_timeout_s = 5;
    ctx.cfg.gateway_name = "gw-a".into();
    // Gateway A's table is the one the API processes wait on for a create's routes.
    let root_a = gpugate_tests::temp_dir("faults-gw-a");
    let root_b = gpugate_tests::temp_dir("faults-gw-b");
    // Removed however the test ends (declared before the gateways, so dropped after them).
    let _roots = RemoveOnDrop(vec![root_a.clone(), root_b.clone()]);
    let table_a = gpugate_tests::table_dir(&root_a).join("routes");
    let table_b = gpugate_tests::table_dir(&root_b).join("routes");
    ctx.table = table_a.clone();
    ctx.cfg.route_table = table_a.clone();
    let (key, public) = common::keypair(&ctx);
    let admin = ctx.token("root", true).await;
    let users: Vec<(String, String)> = {
        let mut u = vec![];
        for name in ["ann", "bob", "cat"] {
            u.push((name.to_string(), ctx.token(name, false).await));
        }
        u
    };
    let watcher = ctx.token("watcher", false).await;

    // The remote host: a second dockerd, reached over TCP with mutual TLS only.
    let mut engine = Engine::start_tls(false);
    engine.load_image(ISO_IMAGE);
    let v = engine.docker_tls(&["version", "--format", "{{.Server.Version}}"]);
    assert!(v.status.success(), "the engine's TLS listener refuses our client certificate: {}", String::from_utf8_lossy(&v.stderr));
    let anon = Command::new("docker").args(["-H", &engine.tls_endpoint(), "version"]).output().expect("docker");
    assert!(!anon.status.success(), "the engine's TCP listener answers a client without a certificate");

    // Settings the child processes take beyond `Ctx::child_env`.
    let conf = ctx.dir.join("gpugate.toml");
    std::fs::write(&conf, "[docker]\ncall_timeout_s = 5\n").expect("config file");
    let conf_s = conf.display().to_string();
    let fail_after = FAIL_AFTER_S.to_string();
    let table_a_s = table_a.display().to_string();
    let table_b_s = table_b.display().to_string();
    let api_env: Vec<(&str, &str)> = vec![
        ("GPUGATE_CONFIG", &conf_s),
        ("GPUGATE_HOST_PROBE_INTERVAL_S", "1"),
        ("GPUGATE_HOST_FAIL_AFTER_S", &fail_after),
        ("GPUGATE_RECONCILE_INTERVAL_S", "3"),
        ("GPUGATE_DEFAULT_SERVICES", "ssh"),
        ("GPUGATE_DEFAULT_IMAGE", ISO_IMAGE),
    ];
    let pub_env = |table: &str, name: &'static str| -> Vec<(String, String)> {
        vec![
            ("GPUGATE_CONFIG".into(), conf_s.clone()),
            ("GPUGATE_ROUTE_TABLE".into(), table.to_string()),
            ("GPUGATE_GATEWAY_NAME".into(), name.into()),
            ("GPUGATE_RECONCILE_INTERVAL_S".into(), "3".into()),
        ]
    };
    let spawn_pub = |ctx: &mut Ctx, which: usize| -> usize {
        let env = if which == 0 { pub_env(&table_a_s, "gw-a") } else { pub_env(&table_b_s, "gw-b") };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ctx.spawn(&["publish"], &env).0
    };
    let p0 = spawn_pub(&mut ctx, 0);
    let p1 = spawn_pub(&mut ctx, 1);
    let (a0, base0) = ctx.spawn(&["serve", "--no-publisher"], &api_env);
    let (a1, base1) = ctx.spawn(&["serve", "--no-publisher"], &api_env);
    ctx.wait_healthy(&base0).await;
    ctx.wait_healthy(&base1).await;
    ctx.base = base0.clone();
    let mut procs = Procs { apis: [a0, a1], publishers: [p0, p1] };
    eprintln!("{} fleet up: APIs {base0} {base1}, remote engine {}", elapsed(t0), engine.tls_endpoint());

    // Register the remote host with its TLS directory.
    let body = json!({
        "name": "h2",
        "docker_endpoint": engine.tls_endpoint(),
        "tls_dir": engine.tls_dir().display().to_string(),
        "upstream_address": "127.0.0.4",
        "gpus": [0, 1],
        "gpu_model": "Stand-in B",
    });
    let (s, v) = ctx.post("/api/v1/admin/hosts", &admin, body).await;
    assert_eq!(s, 201, "adding the TLS host: {v}");
    assert!(wait_health(&ctx, &admin, "h2", "up", Duration::from_secs(30)).await, "h2 (mutual TLS) never probed up");

    let mut gw_a = common::gateway(&root_a, "127.0.0.2", &table_a, POOL.0, POOL.1);
    let mut gw_b = common::gateway(&root_b, "127.0.0.3", &table_b, POOL.0, POOL.1);

    let checker = Checker {
        db_url: ctx.db_url.clone(),
        deployment: ctx.deployment.clone(),
        engines: vec![
            EngineView { host: "local".into(), args: vec![] },
            EngineView { host: "h2".into(), args: vec!["-H".into(), engine.endpoint()] },
        ],
        gateways: vec![
            GatewayView { name: "gw-a".into(), table: table_a.clone() },
            GatewayView { name: "gw-b".into(), table: table_b.clone() },
        ],
        ports: POOL,
    };

    // A workspace no fault touches (on the machine's engine, which is never frozen), with an
    // SSH session through each gateway that must outlive every fault.
    let (s, _) = ctx.post("/api/v1/admin/hosts/h2/drain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &watcher, json!({"name": "steady", "ssh_public_keys": [public.clone()]})).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("local")), "{v}");
    let steady_port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let (s, _) = ctx.post("/api/v1/admin/hosts/h2/undrain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let mut sessions = vec![];
    for addr in ["127.0.0.2", "127.0.0.3"] {
        let mut opened = None;
        for _ in 0..30 {
            let mut sess = Session::open(addr, steady_port, &key);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            if sess.alive(Duration::from_secs(2)) {
                opened = Some(sess);
                break;
            }
        }
        sessions.push(opened.unwrap_or_else(|| panic!("no SSH session via {addr}:{steady_port} into the steady workspace")));
    }
    let first = settle(&checker, false, &BTreeSet::new()).await;
    assert!(first.is_empty(), "violations before any fault:\n{}", first.join("\n"));
    eprintln!("{} steady workspace on port {steady_port}, sessions open; users start", elapsed(t0));

    let shared = Arc::new(Shared {
        bases: Mutex::new(vec![base0.clone(), base1.clone()]),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        errors: Mutex::new(vec![]),
        ops: AtomicU64::new(0),
        tally: Mutex::new(Default::default()),
    });
    let mut tasks = vec![];
    for (name, token) in &users {
        let user_seed = rng.next();
        tasks.push(tokio::spawn(user(shared.clone(), ctx.http.clone(), token.clone(), name.clone(), user_seed, public.clone())));
    }

    let mut violations: Vec<String> = vec![];
    let mut history: Vec<String> = vec![];
    let phase_end = Instant::now() + FAULT_PHASE;
    let mut n = 0;
    while Instant::now() < phase_end {
        tokio::time::sleep(Duration::from_millis(3000 + rng.below(4000))).await;
        n += 1;
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let which = rng.below(2) as usize;
        let mut frozen = BTreeSet::new();
        let what = match fault {
            Fault::KillApi => {
                let i = procs.apis[which];
                ctx.kill(i);
                tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
                let (j, base) = ctx.spawn(&["serve", "--no-publisher"], &api_env);
                procs.apis[which] = j;
                let restart = Instant::now();
                if !healthy_within(&ctx, &base, Duration::from_secs(60)).await {
                    violations.push(format!("fault {n}: the restarted API process {base} did not answer /healthz within 60 s"));
                }
                shared.bases.lock().expect("lock")[which] = base.clone();
                if which == 0 {
                    ctx.base = base.clone();
                }
                format!("kill -9 API {which}, restarted at {base} (healthy in {:.1}s)", restart.elapsed().as_secs_f64())
            }
            Fault::TerminateLiveness => terminate_liveness(&ctx, which).await,
            Fault::RestartPostgres => {
                let t = Instant::now();
                cluster.restart();
                format!("PostgreSQL restarted ({:.1}s down)", t.elapsed().as_secs_f64())
            }
            Fault::FreezeEngine => {
                engine.freeze();
                frozen.insert("h2".to_string());
                // Half the time, an API process also loses its liveness connection while its
                // operations on the frozen host hang: the other process's reconciler may take
                // them over while they still run (the stale-operation case of fencing).
                let also = if rng.below(2) == 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let t = terminate_liveness(&ctx, which).await;
                    tokio::time::sleep(Duration::from_secs(FAIL_AFTER_S + 2)).await;
                    format!(", and 2 s in: {t}")
                } else {
                    tokio::time::sleep(Duration::from_secs(FAIL_AFTER_S + 4)).await;
                    String::new()
                };
                engine.thaw();
                let up = wait_health(&ctx, &admin, "h2", "up", Duration::from_secs(30)).await;
                frozen.clear();
                format!("h2's engine frozen {}s (fail_after_s {FAIL_AFTER_S}) and thawed; probed up again: {up}{also}", FAIL_AFTER_S + 4)
            }
            Fault::KillPublisher => {
                let i = procs.publishers[which];
                ctx.kill(i);
                tokio::time::sleep(Duration::from_millis(500 + rng.below(3000))).await;
                procs.publishers[which] = spawn_pub(&mut ctx, which);
                format!("kill -9 publisher gw-{}, restarted", if which == 0 { "a" } else { "b" })
            }
        };
        let line = format!("fault {n} {what}");
        eprintln!("{} {line}", elapsed(t0));
        history.push(line.clone());
        // The checker looks with the users paused and their requests in flight finished.
        shared.paused.store(true, Ordering::SeqCst);
        let quiet = Instant::now() + Duration::from_secs(30);
        while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < quiet {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // What must never be seen at all, in two looks a second apart (not one, so that a
        // change between the checker's own reads does not count).
        let first = checker.snapshot().await.map(|s| checker.violations(&s, false, &frozen)).unwrap_or_default();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = checker.snapshot().await.map(|s| checker.violations(&s, false, &frozen)).unwrap_or_default();
        for v in first.iter().filter(|v| is_hard(v) && second.contains(v)) {
            eprintln!("{} VIOLATION right after fault {n}: {v}", elapsed(t0));
            violations.push(format!("right after fault {n} ({what}): {v}"));
        }
        let found = settle(&checker, false, &frozen).await;
        for v in &found {
            eprintln!("{} VIOLATION after fault {n}: {v}", elapsed(t0));
            violations.push(format!("after fault {n} ({what}): {v}"));
        }
        for s in &mut sessions {
            if !s.alive(Duration::from_secs(5)) {
                let v = format!("after fault {n} ({what}): the {} into the steady workspace is dead", s.what);
                eprintln!("{} VIOLATION {v}", elapsed(t0));
                violations.push(v);
                // Reopen it, so the next fault is judged on its own.
                *s = Session::open(if s.what.contains("127.0.0.2") { "127.0.0.2" } else { "127.0.0.3" }, steady_port, &key);
            }
        }
        shared.paused.store(false, Ordering::SeqCst);
    }

    // Convergence: users stop, every process is up, reconcile passes run on both APIs.
    shared.stop.store(true, Ordering::SeqCst);
    let joined = Instant::now() + Duration::from_secs(30);
    for t in tasks {
        let left = joined.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, t).await.is_err() {
            violations.push("a user's request did not finish within 30 s of the fault phase's end".into());
        }
    }
    eprintln!("{} fault phase over: {} user operations; converging", elapsed(t0), shared.ops.load(Ordering::SeqCst));
    eprintln!("{} answers: {:?}", elapsed(t0), shared.tally.lock().expect("lock"));
    let bases = shared.bases.lock().expect("lock").clone();
    // Two passes on each process. A process that has just lost its liveness connection skips
    // passes until it holds the lock again (seconds): its refusals are recorded, not counted.
    for base in &bases {
        let mut passes = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while passes < 2 && Instant::now() < deadline {
            match call(&ctx.http, base, reqwest::Method::POST, "/api/v1/admin/reconcile", &admin, Some(json!({}))).await {
                Some((200, _)) => passes += 1,
                other => {
                    eprintln!("{} convergence: POST /admin/reconcile on {base}: {other:?}", elapsed(t0));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if passes < 2 {
            violations.push(format!("convergence: {base} never ran two reconcile passes within 30 s"));
        }
    }
    let found = settle(&checker, true, &BTreeSet::new()).await;
    for v in &found {
        eprintln!("{} VIOLATION after convergence: {v}", elapsed(t0));
        violations.push(format!("after convergence: {v}"));
    }
    // No implicit data loss: a workspace that failed (its host was lost for a while) is
    // recoverable by its owner once the fleet is whole again.
    let failed: Vec<(String, String)> = sqlx::query_as(
        "SELECT e.id, u.name FROM environments e JOIN users u ON u.id = e.owner_id WHERE e.status = 'failed' ORDER BY e.id",
    )
    .fetch_all(ctx.db().pool())
    .await
    .expect("failed environments");
    let mut recovered = 0;
    for (id, owner) in &failed {
        let Some((_, token)) = users.iter().find(|(n, _)| n == owner) else { continue };
        match call(&ctx.http, &ctx.base, reqwest::Method::POST, &format!("/api/v1/environments/{id}/start"), token, None).await {
            Some((200, _)) => recovered += 1,
            other => {
                let v = format!("after convergence: failed environment {id} of {owner} cannot be started again: {other:?}");
                eprintln!("{} VIOLATION {v}", elapsed(t0));
                violations.push(v);
            }
        }
    }
    if recovered > 0 {
        for v in settle(&checker, true, &BTreeSet::new()).await {
            eprintln!("{} VIOLATION after recovering failed workspaces: {v}", elapsed(t0));
            violations.push(format!("after recovering {recovered} failed workspaces: {v}"));
        }
    }
    let counts: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM environments GROUP BY status ORDER BY status")
        .fetch_all(ctx.db().pool())
        .await
        .unwrap_or_default();
    eprintln!("{} environments by status at the end: {counts:?}", elapsed(t0));
    for s in &mut sessions {
        if !s.alive(Duration::from_secs(5)) {
            violations.push(format!("after convergence: the {} into the steady workspace is dead", s.what));
        }
    }
    violations.extend(shared.errors.lock().expect("lock").iter().map(|e| format!("user saw: {e}")));
    gw_a.assert_no_crash();
    gw_b.assert_no_crash();
    eprintln!("{} seed {seed}; faults:\n  {}", elapsed(t0), history.join("\n  "));

    drop(sessions);
    gw_a.stop();
    gw_b.stop();
    ctx.finish().await;
    drop(engine);
    drop(cluster);
    assert!(
        violations.is_empty(),
        "seed {seed} (replay with GPUGATE_FAULT_SEED={seed}): {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
