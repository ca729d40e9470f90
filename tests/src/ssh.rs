//! Full SSH through the gateway as a user drives it with the real OpenSSH client: where a
//! workspace is reached (a pool port, or its name inside TLS), file copies with scp, sftp and
//! rsync, forwards (`-L`, `-R`, `-D`) and a forwarded agent. Every wait here is bounded.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stack::{run, ssh_command, ssh_opts, Login};

/// Where the OpenSSH client finds a workspace.
#[derive(Clone, Debug)]
pub enum Via {
    /// `-p PORT remotegpu@127.0.0.1`: a pool port of the gateway.
    Port(u16),
    /// `-F CONFIG HOST`: the `~/.ssh/config` block of `access_info.ssh.tls` (its ProxyCommand
    /// carries SSH inside TLS to the gateway's TLS port) and the workspace's SSH name.
    Name { config: PathBuf, host: String },
}

impl Via {
    /// A short word for messages and file names.
    pub fn label(&self) -> &'static str {
        match self {
            Via::Port(_) => "port",
            Via::Name { .. } => "name",
        }
    }

    /// How `program` (`ssh`, `scp`, `sftp`) is told where to connect (before the destination).
    fn conn_args(&self, program: &str) -> Vec<String> {
        match self {
            Via::Port(p) => vec![if program == "ssh" { "-p" } else { "-P" }.to_string(), p.to_string()],
            Via::Name { config, .. } => vec!["-F".to_string(), config.display().to_string()],
        }
    }

    /// The destination: `remotegpu@127.0.0.1` or the name (its user is in the config block).
    pub fn dest(&self) -> String {
        match self {
            Via::Port(_) => "remotegpu@127.0.0.1".to_string(),
            Via::Name { host, .. } => host.clone(),
        }
    }

    /// `DEST:path`, for scp and rsync.
    pub fn remote(&self, path: &str) -> String {
        format!("{}:{path}", self.dest())
    }

    /// `ssh [opts] DEST [remote]` with `login`.
    pub fn ssh(&self, login: &Login, opts: &[&str], remote: Option<&str>) -> Command {
        let mut cmd = ssh_command("ssh", login);
        cmd.args(self.conn_args("ssh")).args(opts).arg(self.dest());
        cmd.args(remote);
        cmd
    }

    /// `scp -q FROM TO` (remote paths from `remote`).
    pub fn scp(&self, login: &Login, from: &str, to: &str) -> Output {
        run(ssh_command("scp", login).arg("-q").args(self.conn_args("scp")).args([from, to]))
    }

    /// `sftp -b BATCH DEST`: runs the batch of sftp commands; any failed command fails it.
    pub fn sftp(&self, login: &Login, batch: &Path) -> Output {
        run(ssh_command("sftp", login).args(self.conn_args("sftp")).arg("-b").arg(batch).arg(self.dest()))
    }

    /// `rsync --checksum ARGS... -e "ssh ..."`: rsync at both ends, over the same SSH as the
    /// other clients (key login only).
    pub fn rsync(&self, key: &Path, args: &[&str]) -> Output {
        let mut shell = vec!["ssh".to_string()];
        shell.extend(ssh_opts());
        shell.extend(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"].map(String::from));
        shell.push(key.display().to_string());
        shell.extend(self.conn_args("ssh"));
        run(Command::new("rsync").args(["--checksum", "-e", &shell.join(" ")]).args(args).stdin(Stdio::null()))
    }
}

/// A free loopback port (bound and released: another process could take it in between, which
/// the caller's bounded waits turn into a clear failure).
pub fn free_port() -> u16 {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    l.local_addr().expect("local address").port()
}

/// Whether something accepts TCP connections on `127.0.0.1:port` within `timeout`.
pub fn listening_within(port: u16, timeout: Duration) -> bool {
    crate::wait_until(timeout, || {
        std::thread::sleep(Duration::from_millis(50));
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
    })
}

/// What `127.0.0.1:port` says first within `timeout` (empty when it says nothing, closes or
/// refuses): an SSH server's banner, say, seen through a forward.
pub fn first_bytes(port: u16, timeout: Duration) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout) else {
        return String::new();
    };
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).trim().to_string()
}

/// A loopback TCP service that writes `text` to every connection and closes it: the far end
/// of a `-R` forward. It serves until `stop`.
pub struct Greeter {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Greeter {
    pub fn start(text: &str) -> Greeter {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the greeter");
        listener.set_nonblocking(true).expect("nonblocking greeter");
        let port = listener.local_addr().expect("greeter address").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (text, halt) = (text.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(text.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Greeter { port, stop, thread: Some(thread) }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A background `ssh -N` holding forwards open; killed on drop.
pub struct Forwards {
    child: Child,
}

impl Forwards {
    /// Starts `ssh -N -o ExitOnForwardFailure=yes FORWARDS... DEST` and waits (up to `timeout`)
    /// until every port in `local` listens; Err with ssh's stderr if it exits or they do not.
    pub fn open(via: &Via, login: &Login, forwards: &[String], local: &[u16], timeout: Duration) -> Result<Forwards, String> {
        let mut opts = vec!["-N", "-o", "ExitOnForwardFailure=yes"];
        opts.extend(forwards.iter().map(String::as_str));
        let child = via
            .ssh(login, &opts, None)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn ssh -N: {e}"))?;
        let mut f = Forwards { child };
        let deadline = Instant::now() + timeout;
        for &p in local {
            let up = crate::wait_until(deadline.saturating_duration_since(Instant::now()), || {
                std::thread::sleep(Duration::from_millis(50));
                matches!(f.child.try_wait(), Ok(None))
                    && TcpStream::connect_timeout(&([127, 0, 0, 1], p).into(), Duration::from_millis(200)).is_ok()
            });
            if !up {
                let _ = f.child.kill();
                let _ = f.child.wait();
                let mut err = String::new();
                if let Some(mut e) = f.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("ssh {forwards:?} via {}: port {p} never listened: {}", via.label(), err.trim()));
            }
        }
        Ok(f)
    }

    /// Whether the forwarding ssh is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Forwards {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `ssh-agent` of the test's own (socket in `dir`) holding one key; killed on drop.
pub struct Agent {
    child: Child,
    pub sock: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, key: &Path) -> Agent {
        let sock = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh-agent");
        let agent = Agent { child, sock };
        assert!(crate::wait_until(Duration::from_secs(5), || agent.sock.exists()), "ssh-agent made no socket");
        let out = run(Command::new("ssh-add").arg("-q").arg(key).env("SSH_AUTH_SOCK", &agent.sock).stdin(Stdio::null()));
        assert!(out.status.success(), "ssh-add: {}", String::from_utf8_lossy(&out.stderr));
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// The SHA-256 fingerprint (`SHA256:...`) of a public key file.
pub fn fingerprint(pubkey: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(pubkey));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).unwrap_or_else(|| panic!("ssh-keygen -lf {}: {text}", pubkey.display())).to_string()
}

/// The hex SHA-256 of a local file (`sha256sum`), to compare with the workspace's.
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// The trimmed stdout of `cmd` if it succeeded; Err with its status and stderr.
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = run(cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn succeeded(what: &str, out: &Output) {
    assert!(out.status.success(), "{what}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
}

/// Copies a file into the workspace and back with scp, sftp and rsync through `via`: every copy
/// comes back byte for byte, rsync's copy has the same sha256sum in the workspace, and an rsync
/// of the file changed in its middle updates that copy. Files are named after `via` and have
/// contents of their own, so no copy made through another path can stand in for one.
pub fn copies(via: &Via, key: &Path, dir: &Path) {
    let login = Login::Key(key.to_path_buf());
    let tag = via.label();
    let seed = if tag == "port" { 0x9E37_79B1u32 } else { 0x85EB_CA77 };
    let mut data: Vec<u8> = (0..262_144u32).map(|i| (i.wrapping_mul(seed) >> 24) as u8).collect();
    let local = dir.join(format!("{tag}.bin"));
    std::fs::write(&local, &data).expect("write the file to copy");
    let local_s = local.display().to_string();
    let back = |what: &str| dir.join(format!("{tag}.{what}.back"));
    let same = |path: &Path, data: &[u8], what: &str| {
        assert!(std::fs::read(path).ok().as_deref() == Some(data), "{what} via {tag}: the copy back differs");
    };

    succeeded(&format!("scp in via {tag}"), &via.scp(&login, &local_s, &via.remote(&format!("scp-{tag}.bin"))));
    let b = back("scp");
    succeeded(&format!("scp out via {tag}"), &via.scp(&login, &via.remote(&format!("scp-{tag}.bin")), &b.display().to_string()));
    same(&b, &data, "scp");

    let b = back("sftp");
    let batch = dir.join(format!("{tag}.sftp"));
    std::fs::write(&batch, format!("put {} sftp-{tag}.bin\nget sftp-{tag}.bin {}\n", local.display(), b.display()))
        .expect("write the sftp batch");
    succeeded(&format!("sftp via {tag}"), &via.sftp(&login, &batch));
    same(&b, &data, "sftp");

    let name = format!("rsync-{tag}.bin");
    let remote_sum = || {
        let out = output(&mut via.ssh(&login, &[], Some(&format!("sha256sum {name}"))));
        out.map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
    };
    succeeded(&format!("rsync in via {tag}"), &via.rsync(key, &[&local_s, &via.remote(&name)]));
    assert_eq!(remote_sum().as_deref(), Ok(sha256(&local).as_str()), "rsync in via {tag}: the workspace's sha256sum");
    // A change in the middle: rsync sends it, the copy follows.
    data[100_000..104_096].fill(0xA5);
    std::fs::write(&local, &data).expect("change the file");
    succeeded(&format!("rsync of a changed file via {tag}"), &via.rsync(key, &[&local_s, &via.remote(&name)]));
    assert_eq!(remote_sum().as_deref(), Ok(sha256(&local).as_str()), "rsync update via {tag}: the workspace's sha256sum");
    let b = back("rsync");
    succeeded(&format!("rsync out via {tag}"), &via.rsync(key, &[&via.remote(&name), &b.display().to_string()]));
    same(&b, &data, "rsync");
}

/// `curl -sS -m 5 ARGS... URL`: (HTTP status, body); status 0 and curl's error when no answer
/// came.
fn curl(args: &[&str], url: &str) -> (u16, String) {
    let out = run(Command::new("curl").args(["-sS", "-m", "5", "-w", "\n%{http_code}"]).args(args).arg(url));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    match code.trim().parse() {
        Ok(0) | Err(_) => (0, String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Ok(code) => (code, body.to_string()),
    }
}

/// One `ssh -N` with `-L` to JupyterLab inside the workspace (127.0.0.1:8888 there), `-D`
/// (SOCKS), and `-R` from the workspace's `127.0.0.1:remote_port` back to a service on the
/// client: JupyterLab answers its status with the workspace's `token` through `-L` and through
/// `-D`, and a connection made inside the workspace reads the client's greeting through `-R`.
pub fn forwards(via: &Via, login: &Login, token: &str, remote_port: u16) {
    let tag = via.label();
    let (l, d) = (free_port(), free_port());
    let greeting = format!("hello through -R via {tag}");
    let greeter = Greeter::start(&format!("{greeting}\n"));
    let specs = [
        "-L".to_string(),
        format!("127.0.0.1:{l}:127.0.0.1:8888"),
        "-D".to_string(),
        format!("127.0.0.1:{d}"),
        "-R".to_string(),
        format!("127.0.0.1:{remote_port}:127.0.0.1:{}", greeter.port),
    ];
    let mut fwd = Forwards::open(via, login, &specs, &[l, d], Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    let status = format!("/api/status?token={token}");
    let (code, body) = curl(&[], &format!("http://127.0.0.1:{l}{status}"));
    assert!(code == 200 && body.contains("started"), "-L to JupyterLab via {tag}: {code} {body}");
    let (code, body) = curl(&["--socks5-hostname", &format!("127.0.0.1:{d}")], &format!("http://127.0.0.1:8888{status}"));
    assert!(code == 200 && body.contains("started"), "-D to JupyterLab via {tag}: {code} {body}");
    // The remote listener is confirmed after the local ones: retry a few times.
    let read_back = format!("timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{remote_port} && cat <&3'");
    let mut got = Err(String::from("not tried"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        got = output(&mut via.ssh(login, &[], Some(&read_back)));
        if got.as_deref() == Ok(greeting.as_str()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(got.as_deref(), Ok(greeting.as_str()), "-R from the workspace's port {remote_port} via {tag}");
    assert!(fwd.alive(), "the forwarding ssh via {tag} exited");
}

/// `ssh -A` with the client's agent: `ssh-add -l` in the session lists the agent's key (which
/// is not the login key, so only the forwarded agent can show it).
pub fn agent_forwarding(via: &Via, login: &Login, agent: &Agent, agent_pub: &Path) {
    let listed = output(via.ssh(login, &["-A"], Some("ssh-add -l")).env("SSH_AUTH_SOCK", &agent.sock));
    let want = fingerprint(agent_pub);
    assert!(
        listed.as_ref().is_ok_and(|l| l.contains(&want)),
        "ssh -A via {}: ssh-add -l in the session answered {listed:?}, expected {want}",
        via.label()
    );
}
