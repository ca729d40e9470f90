//! The `gpugate` client as a user runs it: `dist/bin/gpugate` with a home of its own (so its
//! configuration, `~/.ssh/config` block and known_hosts are the test's), an ssh-agent holding
//! the user's key (OpenSSH finds its default keys through the password database, not `$HOME`),
//! and its exit code, standard output and standard error as a script would see them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What one command did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The client with its own home.
pub struct Client {
    pub exe: PathBuf,
    pub home: PathBuf,
    agent_sock: Option<PathBuf>,
}

impl Client {
    /// The client of `dist/`, with `home` as its home (made if missing).
    pub fn new(home: &Path) -> Client {
        let exe = crate::dist().join("bin/gpugate");
        assert!(exe.exists(), "{} is missing: make build installs it", exe.display());
        std::fs::create_dir_all(home).expect("home");
        Client { exe, home: home.to_path_buf(), agent_sock: None }
    }

    /// Logins through `ssh` use the agent at `sock`.
    pub fn with_agent(mut self, sock: &Path) -> Client {
        self.agent_sock = Some(sock.to_path_buf());
        self
    }

    /// The command, before it runs: its own home and configuration, nothing of the caller's.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GPUGATE_CONFIG_DIR")
            .env_remove("GPUGATE_TOKEN")
            .env_remove("SSH_AUTH_SOCK");
        if let Some(sock) = &self.agent_sock {
            cmd.env("SSH_AUTH_SOCK", sock);
        }
        cmd
    }

    /// Runs `gpugate ARGS` with `stdin` as its input.
    pub fn run_with_input(&self, args: &[&str], stdin: &str) -> Ran {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gpugate");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).expect("write stdin");
        drop(input);
        let out = child.wait_with_output().expect("gpugate ran");
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `gpugate ARGS` with no input.
    pub fn run(&self, args: &[&str]) -> Ran {
        self.run_with_input(args, "")
    }

    /// Runs `gpugate ARGS`, asserting it succeeded; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "gpugate {args:?}: exit {}\n{}{}", r.code, r.stdout, r.stderr);
        r.stdout
    }

    /// The client's configuration directory.
    pub fn config_dir(&self) -> PathBuf {
        self.home.join(".config/gpugate")
    }
}

/// Every command of the client against a running stack, errors included; `main_env` is a
/// running workspace reached by name and by port, `dir` a scratch directory.
pub fn commands_against(stack: &crate::stack::Stack, main_env: &serde_json::Value, dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    let id = main_env["id"].as_str().expect("id");
    let dir = dir.join("client");
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("id_ed25519");
    crate::stack::run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key));
    let public = key.with_extension("pub");
    let agent = crate::ssh::Agent::start(&dir, &key);
    let c = Client::new(&dir.join("home")).with_agent(&agent.sock);
    let ca = stack.ca();
    let ca = ca.to_str().expect("utf-8 path");

    // Errors a script can tell apart, and nothing stored by a failed login.
    let r = c.run(&["ls"]);
    assert!(r.code == 3 && r.stderr.contains("gpugate login"), "ls before login: {r:?}");
    let r = c.run(&["login", &stack.api, "--token", "ggt_not-a-token"]);
    assert!(r.code == 1 && r.stderr.contains("HTTP 401"), "a wrong token: {r:?}");
    let r = c.run(&["login", "http://127.0.0.1:9", "--token", "x"]);
    assert!(r.code == 4 && r.stderr.contains("did not answer"), "an API that is down: {r:?}");
    assert!(!c.config_dir().join("config.json").exists(), "a failed login stored something");
    let r = c.run_with_input(&["login", &stack.api, "--gateway", "127.0.0.1", "--ca", ca], &format!("{}\n", stack.token));
    assert_eq!(r.code, 0, "login: {r:?}");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&c.config_dir().join("config.json")), 0o600, "the token file is readable by others");
    assert_eq!(mode(&c.config_dir()), 0o700);

    let listed: serde_json::Value = serde_json::from_str(&c.ok(&["ls", "--json"])).expect("ls --json is JSON");
    assert!(listed.as_array().is_some_and(|a| a.iter().any(|e| e["id"] == id)), "ls --json lacks {id}: {listed}");
    let table = c.ok(&["ls"]);
    assert!(table.starts_with("NAME") && table.contains("e2e-main") && table.contains(id), "{table}");
    let r = c.run(&["ssh", "no-such-workspace", "--", "true"]);
    assert!(r.code == 5 && r.stderr.contains("no-such-workspace"), "an unknown name: {r:?}");
    let r = c.run(&["port-forward", "e2e-main", "8888"]);
    assert!(r.code == 1 && r.stderr.contains("LOCAL:REMOTE"), "a bad forward: {r:?}");
    let r = c.run(&["frobnicate"]);
    assert_eq!(r.code, 2, "an unknown command: {r:?}");

    // Keys, then `gpugate ssh` by name through the TLS port, strict, within seconds.
    let added = c.ok(&["keys", "add", public.to_str().expect("path"), "--name", "client-test"]);
    let fingerprint = crate::ssh::fingerprint(&public);
    assert!(added.contains(&fingerprint), "keys add: {added}");
    let key_id = added.split_whitespace().next().expect("id").to_string();
    let keys: serde_json::Value = serde_json::from_str(&c.ok(&["keys", "ls", "--json"])).expect("JSON");
    assert!(keys["keys"].as_array().is_some_and(|k| k.iter().any(|k| k["fingerprint"] == fingerprint.as_str())), "{keys}");
    let t = Instant::now();
    let hostname = loop {
        let r = c.run(&["ssh", "e2e-main", "--", "hostname"]);
        if r.code == 0 {
            break r.stdout.trim().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "gpugate ssh with the account key after 5 s: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(hostname, id);

    // config-ssh: the dry run writes nothing; the block leaves the user's lines alone; a second
    // run changes nothing; plain OpenSSH then logs in by name and by id, strictly.
    let ssh_config = c.home.join(".ssh/config");
    std::fs::create_dir_all(ssh_config.parent().expect("dir")).expect(".ssh");
    std::fs::write(&ssh_config, "Host mine\n  User me\n").expect("user's config");
    let dry = c.ok(&["config-ssh", "--dry-run"]);
    assert!(dry.contains("+Host e2e-main"), "{dry}");
    assert_eq!(std::fs::read_to_string(&ssh_config).expect("read"), "Host mine\n  User me\n", "--dry-run wrote");
    c.ok(&["config-ssh"]);
    let written = std::fs::read_to_string(&ssh_config).expect("read");
    assert!(written.starts_with("Host mine\n  User me\n") && written.contains(&format!("Host e2e-main {id}\n")), "{written}");
    assert!(c.ok(&["config-ssh"]).contains("up to date"));
    assert_eq!(std::fs::read_to_string(&ssh_config).expect("read"), written, "a second run changed the file");
    assert!(c.ok(&["config-ssh", "--dry-run"]).contains("no changes"));
    for alias in ["e2e-main", id] {
        let out = crate::stack::run(
            Command::new("ssh").arg("-F").arg(&ssh_config).args(["-o", "BatchMode=yes", alias, "hostname"]).env("SSH_AUTH_SOCK", &agent.sock),
        );
        assert!(out.status.success(), "ssh -F <config-ssh's file> {alias}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    }

    // port-forward: the workspace's own JupyterLab on a local port.
    let local = crate::ssh::free_port();
    let mut forward = c
        .command(&["port-forward", "e2e-main", &format!("127.0.0.1:{local}:8888")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("port-forward");
    let listening = crate::ssh::listening_within(local, Duration::from_secs(10));
    let token = main_env["access_info"]["jupyter"]["token"].as_str().unwrap_or_default();
    let status = crate::stack::run(Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"]).arg(format!(
        "http://127.0.0.1:{local}/api/status?token={token}"
    )));
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(listening, "port-forward did not listen on {local}");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "200", "JupyterLab through port-forward");

    // The lifecycle, and a login after a stop and start with the same strict known_hosts.
    let created: serde_json::Value =
        serde_json::from_str(&c.ok(&["create", "e2e-cli", "--wait", "--json"])).expect("create --json is JSON");
    let cli_id = created["id"].as_str().expect("id").to_string();
    let login = |what: &str| {
        let r = c.run(&["ssh", "e2e-cli", "--", "hostname"]);
        assert_eq!((r.code, r.stdout.trim()), (0, cli_id.as_str()), "gpugate ssh {what}: {}", r.stderr);
    };
    login("after create");
    assert!(c.ok(&["stop", "e2e-cli"]).contains("stopped"));
    assert!(c.ok(&["start", "e2e-cli", "--wait"]).contains("running"));
    login("after a stop and start (no host key warning)");
    c.ok(&["rm", "e2e-cli"]);
    let listed: serde_json::Value = serde_json::from_str(&c.ok(&["ls", "--json"])).expect("JSON");
    assert!(
        !listed.as_array().is_some_and(|a| a.iter().any(|e| e["id"] == cli_id.as_str() && e["status"] != "deleted")),
        "rm left it: {listed}"
    );

    c.ok(&["keys", "rm", &key_id]);
    let r = c.run(&["keys", "rm", &key_id]);
    assert!(r.code == 1 && r.stderr.contains("HTTP 404"), "a key removed twice: {r:?}");
    drop(agent);
}
