//! A PostgreSQL cluster owned by one test (initdb + pg_ctl on a free loopback port, as
//! scripts/pg.sh makes the shared one), so that the test may restart or stop it without
//! touching the cluster other tests use. Dropping it stops the server and removes its files,
//! also when the test failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A throw-away cluster on 127.0.0.1.
pub struct Cluster {
    /// Data directory, log and socket live here.
    pub dir: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
    running: bool,
}

fn pg_bin() -> PathBuf {
    let mut dirs = vec![PathBuf::from("/usr/lib/postgresql/15/bin")];
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")));
    }
    dirs.into_iter()
        .find(|d| d.join("initdb").exists())
        .expect("PostgreSQL server binaries not found (apt-get install postgresql)")
}

impl Cluster {
    /// Initialises and starts a cluster; waits until it accepts connections.
    pub fn start() -> Cluster {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("gpugate-pg-{}", super::rand_suffix()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        // PostgreSQL refuses to run as root: the files belong to `postgres` then.
        let as_postgres = nix_uid() == 0;
        if as_postgres {
            let ok = Command::new("chown").arg("postgres:").arg(&dir).status().expect("chown").success();
            assert!(ok, "chown postgres {}", dir.display());
        }
        let port = super::free_port();
        let mut c = Cluster { dir, port, bin, as_postgres, running: false };
        let init = c.tool("initdb", &["-D", &c.data(), "-U", "postgres", "-A", "trust", "--no-sync"]);
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        c.pg_start();
        c
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn tool(&self, name: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).output().unwrap_or_else(|e| panic!("run {name}: {e}"))
    }

    fn pg_start(&mut self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        let out = self.tool("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "-o", &opts, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
        self.running = true;
    }

    /// The superuser URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Restarts the server (`-m fast`: every session is ended, as a database fail-over or an
    /// operator's restart does); returns once it accepts connections again.
    pub fn restart(&mut self) {
        let out = self.tool("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
        self.pg_start();
    }

    /// The server's log (for a failure's evidence).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

fn nix_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(1)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.tool("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "-t", "30", "stop"]);
        }
        let _ = std::fs::remove_dir_all(Path::new(&self.dir));
    }
}
