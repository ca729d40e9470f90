//! How the tool ends and talks: every write to stdout is checked, a closed pipe ends the process
//! quietly with status 141, and any other I/O error becomes a message and status 1, never a panic.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has gone returns `BrokenPipe`
//! (and `println!` would panic on it). 141 is what a shell shows for a classic Unix tool killed
//! by SIGPIPE (128 + 13), so `gpugate-routes dump | head` looks like `cat FILE | head`.

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

/// The exit status after stdout was closed by its reader: 128 + SIGPIPE, as shells report it.
pub const CLOSED_PIPE_STATUS: u8 = 141;

/// Why a command stopped short.
#[derive(Debug)]
pub enum Failure {
    /// The reader of stdout went away (`dump | head`): exit quietly with [`CLOSED_PIPE_STATUS`].
    ClosedPipe,
    /// An error to print as `gpugate-routes: <message>`, then exit 1.
    Error(String),
    /// Already reported on stderr (the bad lines of `apply`): exit 1.
    Reported,
}

impl Failure {
    /// A failed write to stdout.
    pub fn stdout(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure::ClosedPipe
        } else {
            Failure::Error(format!("cannot write to stdout: {e}"))
        }
    }

    /// Reports the failure (if it has something to say) and gives the exit status.
    pub fn exit(self) -> ExitCode {
        match self {
            Failure::ClosedPipe => ExitCode::from(CLOSED_PIPE_STATUS),
            Failure::Error(msg) => {
                warn(format_args!("gpugate-routes: {msg}"));
                ExitCode::FAILURE
            }
            Failure::Reported => ExitCode::FAILURE,
        }
    }
}

impl From<gpugate_routes::Error> for Failure {
    fn from(e: gpugate_routes::Error) -> Failure {
        Failure::Error(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(msg: String) -> Failure {
        Failure::Error(msg)
    }
}

/// Writes one line to stderr. A failure to write there is ignored: there is nowhere left to
/// report it, and `eprintln!` would panic instead.
pub fn warn(line: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(line).and_then(|()| err.write_all(b"\n"));
}

/// Writes one line to stdout and flushes it (the single commands' confirmation).
pub fn say(line: fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(Failure::stdout)
}
