//! A second Docker engine started by a test beside the machine's own: its own socket, data
//! root, exec root, pidfile, bridge and containerd namespaces. With a stand-in
//! `nvidia-container-runtime-hook` on its `PATH` it registers Docker's `nvidia` device driver,
//! so GPU device requests take the production path without a GPU. Started with
//! [`Engine::start_tls`] it also listens on 127.0.0.1 over TCP with mutual TLS (certificates
//! made with `openssl` for the test), the way a remote GPU host's engine is reached. Dropping
//! it stops the daemon and removes its bridge and directories, also when the test failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The stand-in for the NVIDIA Container Toolkit's hook. Docker runs it as an OCI prestart
/// hook with the container's state on stdin. It records each call, and at prestart creates a
/// device node `/dev/nvidia<index>` in the container for every id in the container's
/// NVIDIA_VISIBLE_DEVICES (a UUID, looked up in the GPU list the stand-in nvidia-smi prints,
/// or an index), inside the container's mount namespace, as the real hook exposes the real
/// devices. An id it does not know fails the container's start, as the real one does.
const HOOK: &str = r#"#!/bin/sh
dir=__DIR__
state=$(cat)
echo "call $*" >> "$dir/hook.log"
[ "$1" = prestart ] || exit 0
bundle=$(printf '%s' "$state" | sed -n 's/.*"bundle":"\([^"]*\)".*/\1/p')
pid=$(printf '%s' "$state" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
config=$(cat "$bundle/config.json")
root=$(printf '%s' "$config" | sed -n 's/.*"root":{"path":"\([^"]*\)".*/\1/p')
case "$root" in /*) ;; *) root="$bundle/$root" ;; esac
devices=$(printf '%s' "$config" | grep -o '"NVIDIA_VISIBLE_DEVICES=[^"]*"' | tail -n 1 | sed 's/^"NVIDIA_VISIBLE_DEVICES=//; s/"$//')
echo "prestart devices=$devices" >> "$dir/hook.log"
case "$devices" in ""|void|none) exit 0 ;; esac
for id in $(printf '%s' "$devices" | tr ',' ' '); do
  index=$(awk -F', *' -v id="$id" '$2 == id || $1 == id { print $1 }' "$dir/gpus.csv")
  if [ -z "$index" ]; then echo "stand-in hook: unknown device $id" >&2; exit 1; fi
  nsenter -t "$pid" -m mknod "$root/dev/nvidia$index" c 1 3 || exit 1
done
"#;

/// The stand-in `nvidia-smi`: prints the fixed GPU list `gpus.csv` (which the test edits
/// between passes) for exactly the query gpugate sends, and records each call.
const SMI: &str = r#"#!/bin/sh
dir=__DIR__
echo "$*" >> "$dir/smi.log"
case "$*" in
  "--query-gpu=index,uuid,name,memory.total --format=csv,noheader") cat "$dir/gpus.csv" ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"#;

fn rand_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("rng");
    b.iter().map(|x| format!("{:02x}", x)).collect()
}

/// A second dockerd owned by one test.
pub struct Engine {
    /// Everything it writes lives here.
    pub dir: PathBuf,
    /// Its API socket.
    pub sock: PathBuf,
    bridge: String,
    namespace: String,
    /// The address pool's second octet and third octet base.
    pool: (u32, u32),
    hook: bool,
    frozen: bool,
    child: Option<Child>,
    /// The TCP port of its mutual-TLS listener (on 127.0.0.1), when it has one.
    pub tls_port: Option<u16>,
}

impl Engine {
    /// Starts a daemon; with `hook`, the stand-in `nvidia-container-runtime-hook` is on its
    /// `PATH`. Also writes the stand-in `nvidia-smi` (see [`Engine::nvidia_smi`]).
    pub fn start(hook: bool) -> Engine {
        Engine::start_with(hook, false)
    }

    /// [`Engine::start`], also listening on `tcp://127.0.0.1:<port>` with mutual TLS: a CA,
    /// a server certificate for 127.0.0.1 and a client certificate, all made here; the
    /// client's files (`ca.pem`, `cert.pem`, `key.pem`) are in [`Engine::tls_dir`], the form a
    /// host's `tls_dir` takes.
    pub fn start_tls(hook: bool) -> Engine {
        Engine::start_with(hook, true)
    }

    fn start_with(hook: bool, tls: bool) -> Engine {
        let id = rand_hex(4);
        let dir = PathBuf::from(format!("/tmp/gg-eng-{id}"));
        std::fs::create_dir_all(dir.join("bin")).expect("engine dir");
        let bridge = format!("gg{id}");
        let namespace = format!("gg-eng-{id}");
        let octet = 100 + (u32::from_str_radix(&id[..2], 16).expect("hex") % 100);
        let third = u32::from_str_radix(&id[2..4], 16).expect("hex");
        let mut engine =
            Engine { sock: dir.join("d.sock"), dir, bridge, namespace, pool: (octet, third), hook, frozen: false, child: None, tls_port: None };
        let write = |name: &str, text: &str| {
            let path = engine.dir.join("bin").join(name);
            std::fs::write(&path, text.replace("__DIR__", &engine.dir.display().to_string())).expect("write script");
            run(Command::new("chmod").arg("755").arg(&path));
        };
        write("nvidia-smi", SMI);
        if hook {
            write("nvidia-container-runtime-hook", HOOK);
        }
        std::fs::write(engine.dir.join("daemon.json"), "{}").expect("daemon.json");
        // The bridge and a private address pool in 10.x: nothing else on the host uses them.
        run(Command::new("ip").args(["link", "add", &engine.bridge, "type", "bridge"]));
        run(Command::new("ip").args(["addr", "add", &format!("10.{octet}.{third}.1/24"), "dev", &engine.bridge]));
        run(Command::new("ip").args(["link", "set", &engine.bridge, "up"]));
        if tls {
            engine.make_certificates();
            engine.tls_port = Some(super::free_port());
        }
        engine.spawn_daemon();
        engine
    }

    /// The directory of the client's TLS files (`ca.pem`, `cert.pem`, `key.pem`).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls-client")
    }

    /// `tcp://127.0.0.1:<port>` of the mutual-TLS listener.
    pub fn tls_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.tls_port.expect("started with start_tls"))
    }

    /// A CA, the daemon's certificate (for IP 127.0.0.1, server use) and a client certificate
    /// (client use), each signed by the CA, with EC P-256 keys.
    fn make_certificates(&self) {
        let server = self.dir.join("tls-server");
        let client = self.tls_dir();
        std::fs::create_dir_all(&server).expect("tls dir");
        std::fs::create_dir_all(&client).expect("tls dir");
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&self.dir).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=gpugate test CA", "-keyout", "ca-key.pem", "-out", "tls-server/ca.pem"];
        ca.extend_from_slice(&ec);
        ssl(&ca);
        std::fs::copy(server.join("ca.pem"), client.join("ca.pem")).expect("copy ca");
        std::fs::write(self.dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
        std::fs::write(self.dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for (who, key, cert, subj, ext) in [
            ("server", "tls-server/key.pem", "tls-server/cert.pem", "/CN=127.0.0.1", "server.ext"),
            ("client", "tls-client/key.pem", "tls-client/cert.pem", "/CN=gpugate-api", "client.ext"),
        ] {
            let csr = format!("{who}.csr");
            let mut req = vec!["req", "-new", "-subj", subj, "-keyout", key, "-out", &csr];
            req.extend_from_slice(&ec);
            ssl(&req);
            ssl(&[
                "x509", "-req", "-in", &csr, "-CA", "tls-server/ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
                "-extfile", ext, "-out", cert,
            ]);
        }
    }

    fn spawn_daemon(&mut self) {
        let (octet, third) = self.pool;
        let path = if self.hook {
            format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", self.dir.join("bin").display())
        } else {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()
        };
        let d = &self.dir;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("dockerd.log")).expect("log");
        let child = Command::new("dockerd")
            .env_clear()
            .env("PATH", path)
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(["--bridge", &self.bridge, "--iptables=false", "--ip-masq=false"])
            .args(["--default-address-pool", &format!("base=10.{octet}.{}.0/24,size=28", (third + 128) % 256)])
            .args(["--containerd-namespace", &self.namespace])
            .args(["--containerd-plugins-namespace", &format!("{}-plugins", self.namespace)])
            .args(self.tls_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.docker(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the second dockerd did not answer: {}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's arguments for its mutual-TLS listener (none without one).
    fn tls_args(&self) -> Vec<String> {
        let Some(port) = self.tls_port else { return vec![] };
        let server = self.dir.join("tls-server");
        let f = |n: &str| server.join(n).display().to_string();
        vec![
            "--tlsverify".into(),
            "--tlscacert".into(),
            f("ca.pem"),
            "--tlscert".into(),
            f("cert.pem"),
            "--tlskey".into(),
            f("key.pem"),
            "-H".into(),
            format!("tcp://127.0.0.1:{port}"),
        ]
    }

    /// Runs the docker CLI against this engine's mutual-TLS listener with the client's
    /// certificates.
    pub fn docker_tls(&self, args: &[&str]) -> std::process::Output {
        let c = self.tls_dir();
        Command::new("docker")
            .arg("--tlsverify")
            .arg("--tlscacert")
            .arg(c.join("ca.pem"))
            .arg("--tlscert")
            .arg(c.join("cert.pem"))
            .arg("--tlskey")
            .arg(c.join("key.pem"))
            .arg("-H")
            .arg(self.tls_endpoint())
            .args(args)
            .output()
            .expect("docker CLI")
    }

    /// Freezes the daemon (SIGSTOP): its API stops answering while its containers keep
    /// running, as a host cut off from the control plane. [`Engine::thaw`] undoes it.
    ///
    /// Not a stop and restart: a dockerd restarted with a data root whose network store names
    /// a user-supplied bridge deletes the machine's own `docker0` (seen with Engine 20.10),
    /// which would break every other test on the machine's engine.
    pub fn freeze(&mut self) {
        if let Some(child) = &self.child {
            run(Command::new("kill").arg("-STOP").arg(child.id().to_string()));
            self.frozen = true;
        }
    }

    /// Lets a frozen daemon run again.
    pub fn thaw(&mut self) {
        if let Some(child) = &self.child {
            run(Command::new("kill").arg("-CONT").arg(child.id().to_string()));
            self.frozen = false;
        }
    }

    /// The endpoint gpugate's `docker.endpoint` takes.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker").arg("-H").arg(self.endpoint()).args(args).output().expect("docker CLI")
    }

    /// Copies `image` from the machine's engine into this one.
    pub fn load_image(&self, image: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("docker save {image} | docker -H {} load -q", self.endpoint()))
            .status()
            .expect("docker save | load")
            .success();
        assert!(ok, "loading {image} into the second engine failed");
    }

    /// The stand-in `nvidia-smi`; it prints [`Engine::set_gpus`]' list.
    pub fn nvidia_smi(&self) -> PathBuf {
        self.dir.join("bin").join("nvidia-smi")
    }

    /// Sets the GPU list (nvidia-smi CSV lines: index, uuid, name, memory).
    pub fn set_gpus(&self, lines: &[&str]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join("gpus.csv"), text).expect("gpus.csv");
    }

    /// What the stand-in hook recorded.
    pub fn hook_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hook.log")).unwrap_or_default()
    }

    /// `docker inspect` of a container of this engine.
    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let out = self.docker(&["inspect", id]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
        v[0].clone()
    }

    /// Runs a command in a container of this engine; returns stdout.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", id];
        args.extend_from_slice(cmd);
        let out = self.docker(&args);
        assert!(out.status.success(), "docker exec {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ids of the containers of deployment `deployment` on this engine.
    pub fn containers(&self, deployment: &str) -> Vec<String> {
        let out = self.docker(&["ps", "-aq", "--filter", &format!("label=gpugate.deployment={deployment}")]);
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// The GPU indexes a container of this engine has device nodes for (`/dev/nvidia<N>`).
    pub fn gpu_nodes(&self, container: &str) -> Vec<u32> {
        super::nvidia_indexes(&self.exec(container, &["ls", "/dev"]))
    }
}

/// SIGTERM, then SIGKILL after 20 s.
fn stop_child(mut child: Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for Engine {
    // Synchronous, and whatever state the test left: containers, daemon (and the containerd
    // it started under its exec root), mounts, bridge, files.
    fn drop(&mut self) {
        if self.frozen {
            self.thaw();
        }
        if let Some(child) = self.child.take() {
            let ids = self.docker(&["ps", "-aq"]);
            let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout).lines().map(str::to_string).collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(&args);
            }
            stop_child(child);
        }
        // Mounts the daemon left under its directories (deepest first).
        let dir = self.dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let _ = std::fs::remove_dir_all(Path::new(&self.dir));
    }
}
