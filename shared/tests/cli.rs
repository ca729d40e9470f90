//! The `gpugate-routes` binary as an operator runs it: `apply` from a file and from stdin, bad
//! lines, `dump` filters, and a closed pipe or a failing stdout (no panic, documented status).

use std::fs::DirBuilder;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_gpugate-routes");

/// The status documented for a closed stdout: 128 + SIGPIPE, as shells show it.
const CLOSED_PIPE: i32 = 141;

/// A fresh directory (mode 0755) holding one table, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "gpugate-cli-{name}-{}-{n}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        DirBuilder::new().mode(0o755).create(&dir).expect("create the scratch directory");
        // The umask may have taken bits away; the writer wants exactly this.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the scratch directory");
        Scratch(dir)
    }

    fn table(&self) -> PathBuf {
        self.0.join("routes")
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write an input file");
        path
    }

    /// Runs the binary on this table with `args`, stdin from `input`.
    fn run(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(BIN)
            .arg("--table")
            .arg(self.table())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gpugate-routes");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let text = input.to_owned();
        // A writer thread, so a large input cannot dead-lock against a full stdout pipe.
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
        let out = child.wait_with_output().expect("wait for gpugate-routes");
        feeder.join().expect("stdin feeder");
        out
    }

    /// (port, upstream, env, service) of every route `dump --json FILTERS` prints.
    fn routes(&self, filters: &[&str]) -> Vec<(u16, String, String, String)> {
        let mut args = vec!["dump", "--json"];
        args.extend_from_slice(filters);
        let out = self.run(&args, "");
        assert_eq!(out.status.code(), Some(0), "dump failed: {}", text(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dump prints JSON");
        let routes = doc["routes"].as_array().expect("a routes array");
        routes
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                let port = r["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
                (port, s("upstream"), s("env_id"), s("service"))
            })
            .collect()
    }

    fn ports(&self, filters: &[&str]) -> Vec<u16> {
        self.routes(filters).into_iter().map(|r| r.0).collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_no_panic(what: &str, stderr: &str) {
    for bad in ["panicked", "Broken pipe", "failed printing"] {
        assert!(!stderr.contains(bad), "{what}: stderr says {bad:?}:\n{stderr}");
    }
}

#[test]
fn apply_from_a_file_sets_and_removes_with_comments_and_blank_lines() {
    let s = Scratch::new("file");
    let file = s.file(
        "changes",
        "# workspace ab12\n\
         set 20417 10.0.0.7:22 --env ab12 --service ssh\n\
         \n\
         set 30112 10.0.0.7:8888 --env ab12 --service jupyter --ttl 3600   # trailing comment\n\
         \tset 40088 [::1]:8080 --env cd34 --service code --generation 77\n\
         set 20418 10.0.0.8:22\n\
         rm 20418\n",
    );
    let out = s.run(&["apply", file.to_str().expect("utf-8 path")], "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("applied 5, failed 0, in "), "summary: {err}");
    assert!(out.stdout.is_empty(), "stdout stays clean: {}", text(&out.stdout));
    assert_eq!(
        s.routes(&[]),
        vec![
            (20417, "10.0.0.7:22".into(), "ab12".into(), "ssh".into()),
            (30112, "10.0.0.7:8888".into(), "ab12".into(), "jupyter".into()),
            (40088, "[::1]:8080".into(), "cd34".into(), "code".into()),
        ]
    );
    let out = s.run(&["dump", "--json", "--ports", "40088"], "");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["routes"][0]["generation"], 77, "--generation is honoured in apply lines");
}

#[test]
fn apply_from_stdin() {
    let s = Scratch::new("stdin");
    let out =
        s.run(&["apply", "-"], "set 20001 127.0.0.1:2201 --env e1\nset 20002 127.0.0.1:2202\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("applied 2, failed 0"), "{}", text(&out.stderr));
    assert_eq!(s.ports(&[]), vec![20001, 20002]);
    // No FILE means stdin too.
    let out = s.run(&["apply"], "rm 20001\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(s.ports(&[]), vec![20002]);
}

const WITH_BAD_LINE_3: &str = "set 20001 127.0.0.1:1\n\
                               set 20002 127.0.0.1:2\n\
                               set 20003 not-an-address:3\n\
                               set 20004 127.0.0.1:4\n";

#[test]
fn a_bad_line_stops_the_batch_by_default() {
    for flags in [&[][..], &["--stop-on-error"][..]] {
        let s = Scratch::new("stop");
        let mut args = vec!["apply"];
        args.extend_from_slice(flags);
        let out = s.run(&args, WITH_BAD_LINE_3);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains("line 3: invalid value 'not-an-address:3'"), "{flags:?}: {err}");
        assert!(err.contains("applied 2, failed 1"), "{flags:?}: {err}");
        assert_eq!(s.ports(&[]), vec![20001, 20002], "{flags:?}: lines after the bad one");
    }
}

#[test]
fn keep_going_applies_the_lines_after_a_bad_one_and_still_fails() {
    let s = Scratch::new("keep");
    let input =
        format!("{WITH_BAD_LINE_3}sett 20005 127.0.0.1:5\nrm 29999\nset 20006 127.0.0.1:6\n");
    let out = s.run(&["apply", "--keep-going"], &input);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 3: "), "{err}");
    assert!(err.contains("line 5: unrecognized subcommand 'sett'"), "{err}");
    assert!(err.contains("line 6: port 29999 has no route"), "{err}");
    assert!(err.contains("applied 4, failed 3"), "{err}");
    assert_eq!(s.ports(&[]), vec![20001, 20002, 20004, 20006]);
}

#[test]
fn apply_of_a_missing_file_takes_no_lock_and_creates_no_table() {
    let s = Scratch::new("missing");
    let out = s.run(&["apply", s.0.join("nope").to_str().expect("utf-8 path")], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"), "{}", text(&out.stderr));
    assert!(!s.table().exists(), "the table was created");
}

#[test]
fn apply_of_unreadable_input_is_a_message_and_status_1() {
    let s = Scratch::new("unreadable");
    // A directory opens but cannot be read.
    let out = s.run(&["apply", s.0.to_str().expect("utf-8 path")], "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read") && err.contains("Is a directory"), "{err}");
    assert!(err.contains("applied 0, failed 1"), "{err}");
    assert_no_panic("apply DIR", &err);
}

/// `apply --echo -` as a session: each line is applied and answered before the next is sent,
/// and the change is visible to a reader while the session still holds the lock.
#[test]
fn echo_session_answers_each_line_as_it_is_applied() {
    let s = Scratch::new("session");
    let mut child = Command::new(BIN)
        .arg("--table")
        .arg(s.table())
        .args(["apply", "--echo", "--keep-going", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start apply");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut ask = |line: &str| {
        stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()).expect("send a line");
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no answer to {line:?}: {e}"))
    };
    assert_eq!(ask("set 21000 127.0.0.1:22 --env live\n"), "ok 1");
    // The session is still open (stdin not closed): the route is already in the table.
    assert_eq!(s.ports(&["--env", "live"]), vec![21000]);
    assert_eq!(ask("# comments get no answer\nset 21001 127.0.0.1:23\n"), "ok 3");
    assert_eq!(ask("rm 21999\n"), "error 4: port 21999 has no route");
    assert_eq!(ask("rm 21000\n"), "ok 5");
    assert_eq!(s.ports(&[]), vec![21001]);
    // A second writer is refused while the session holds the lock.
    let out = s.run(&["set", "21002", "127.0.0.1:24"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("locked by another writer"), "{}", text(&out.stderr));
    drop(stdin);
    let out = child.wait_with_output().expect("wait for apply");
    assert_eq!(out.status.code(), Some(1), "one line failed");
    assert!(text(&out.stderr).contains("applied 3, failed 1"), "{}", text(&out.stderr));
}

#[test]
fn dump_filters_by_env_service_and_ports() {
    let s = Scratch::new("filters");
    let out = s.run(
        &["apply"],
        "set 20001 10.0.0.1:22 --env alpha --service ssh\n\
         set 20002 10.0.0.1:8888 --env alpha --service jupyter\n\
         set 20003 10.0.0.2:22 --env beta --service ssh\n\
         set 30001 10.0.0.2:8080 --env beta --service code\n\
         set 30002 10.0.0.3:22 --service ssh\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(s.ports(&[]), vec![20001, 20002, 20003, 30001, 30002]);
    assert_eq!(s.ports(&["--env", "alpha"]), vec![20001, 20002]);
    assert_eq!(s.ports(&["--service", "ssh"]), vec![20001, 20003, 30002]);
    assert_eq!(s.ports(&["--ports", "20002-30001"]), vec![20002, 20003, 30001]);
    assert_eq!(s.ports(&["--ports", "30002"]), vec![30002]);
    assert_eq!(s.ports(&["--env", "beta", "--service", "ssh"]), vec![20003]);
    assert_eq!(s.ports(&["--env", "beta", "--ports", "30000-30999"]), vec![30001]);
    assert_eq!(s.ports(&["--env", "gamma"]), Vec::<u16>::new());

    // The table form, filtered: the header, the column names, then one line per route.
    let out = s.run(&["dump", "--service", "ssh", "--ports", "20000-29999"], "");
    assert_eq!(out.status.code(), Some(0));
    let dump = text(&out.stdout);
    let rows: Vec<&str> = dump.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{dump}");
    assert!(rows[0].starts_with("20001 ") && rows[0].contains("alpha"), "{dump}");
    assert!(rows[1].starts_with("20003 ") && rows[1].contains("beta"), "{dump}");

    for (flag, value, says) in [
        ("--ports", "30001-20001", "is empty"),
        ("--ports", "0-10", "not a port range"),
        ("--service", "http", "unknown service"),
        ("--env", "Bad!", "only a-z"),
    ] {
        let out = s.run(&["dump", flag, value], "");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(text(&out.stderr).contains(says), "{flag} {value}: {}", text(&out.stderr));
    }
}

/// A table with `n` routes, long enough that its dump overflows a pipe's buffer.
fn many_routes(s: &Scratch, n: u16) {
    let lines: String = (0..n)
        .map(|i| format!("set {} 10.1.2.3:22 --env many --service ssh\n", 20000 + i))
        .collect();
    let out = s.run(&["apply"], &lines);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn dump_into_head_exits_quietly() {
    let s = Scratch::new("head");
    many_routes(&s, 2000);
    for json in ["", " --json"] {
        // The status of dump itself, not of head, goes to stderr beside dump's own stderr.
        let script =
            format!("(\"$0\" --table \"$1\" dump{json}; echo \"dump status $?\" >&2) | head -1");
        let out =
            Command::new("sh").args(["-c", &script, BIN]).arg(s.table()).output().expect("run sh");
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_no_panic(&format!("dump{json} | head -1"), &stderr);
        assert!(stderr.contains(&format!("dump status {CLOSED_PIPE}")), "dump{json}: {stderr}");
        assert_eq!(stdout.lines().count(), 1, "dump{json}: {stdout}");
        let first = if json.is_empty() { "# table " } else { "{" };
        assert!(stdout.starts_with(first), "dump{json}: {stdout}");
    }
}

/// A pipe whose reader has already gone: every write to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().expect("run true");
    let write_end = reader.stdin.take().expect("stdin is piped");
    reader.wait().expect("wait for true");
    Stdio::from(write_end)
}

#[test]
fn every_subcommand_exits_quietly_on_a_closed_pipe() {
    let s = Scratch::new("pipe");
    many_routes(&s, 10);
    let apply_input = s.file("changes", "set 20100 127.0.0.1:22\nset 20101 127.0.0.1:22\n");
    let apply_input = apply_input.to_str().expect("utf-8 path");
    for args in [
        &["init"][..],
        &["set", "20200", "127.0.0.1:22"][..],
        &["rm", "20200"][..],
        &["apply", "--echo", apply_input][..],
        &["dump"][..],
        &["dump", "--json"][..],
        &["--help"][..],
    ] {
        let out = Command::new(BIN)
            .arg("--table")
            .arg(s.table())
            .args(args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .expect("run gpugate-routes");
        let stderr = text(&out.stderr);
        assert_no_panic(&format!("{args:?}"), &stderr);
        assert_eq!(out.status.code(), Some(CLOSED_PIPE), "{args:?}: {stderr}");
    }
    // apply stops at the first answer it cannot deliver: line 1 applied, line 2 not read.
    assert!(s.ports(&[]).contains(&20100));
    assert!(!s.ports(&[]).contains(&20101));
}

/// Any other I/O error on stdout is a message and status 1, not a panic.
#[test]
fn a_failing_stdout_is_a_message_not_a_panic() {
    let s = Scratch::new("full");
    for args in [&["set", "20300", "127.0.0.1:22"][..], &["dump"][..]] {
        let full =
            std::fs::OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
        let out = Command::new(BIN)
            .arg("--table")
            .arg(s.table())
            .args(args)
            .stdout(full)
            .stderr(Stdio::piped())
            .output()
            .expect("run gpugate-routes");
        let stderr = text(&out.stderr);
        assert_no_panic(&format!("{args:?}"), &stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to stdout: No space left on device"),
            "{args:?}: {stderr}"
        );
    }
}
