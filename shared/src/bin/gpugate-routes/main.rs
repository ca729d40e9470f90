//! `gpugate-routes`: the operator's tool for the route table (init, set, rm, apply, dump).
//!
//! - `change`: the `set`/`rm` arguments and how a change is written, shared with `apply`.
//! - `apply`: many changes under one writer lock, from a file or stdin.
//! - `dump`: the routes, filtered, as a table or JSON.
//! - `out`: checked output; a closed pipe exits quietly (141), other I/O errors exit 1.

mod apply;
mod change;
mod dump;
mod out;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpugate_routes::{LockMode, Table, Writer, DEFAULT_TABLE_PATH};

use crate::apply::ApplyArgs;
use crate::change::Change;
use crate::dump::DumpArgs;
use crate::out::{say, Failure, CLOSED_PIPE_STATUS};

/// Inspect and change the gpugate route table.
///
/// Writing takes the table's writer lock: while a publisher (gpugate-api) runs, `set`, `rm`,
/// `apply` and `init` fail with the holder's pid. `dump` never takes the lock.
///
/// Exit status: 0 success; 1 an error (for `apply`: any bad line); 2 a usage error;
/// 141 stdout was closed by its reader (`dump | head`), as for a tool killed by SIGPIPE.
#[derive(Parser)]
#[command(name = "gpugate-routes", version)]
struct Cli {
    /// The route-table file.
    #[arg(long, global = true, env = "GPUGATE_ROUTE_TABLE", default_value = DEFAULT_TABLE_PATH)]
    table: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create and initialise the table file (does nothing to a valid existing table).
    Init,
    #[command(flatten)]
    Change(Change),
    /// Apply `set` and `rm` lines from FILE or stdin under one writer lock, each as it is read.
    ///
    /// A line holds one change in the syntax of the single commands, without the program name
    /// or `--table`: `set PORT HOST:PORT [--env ID] [--service NAME] [--ttl S] [--generation N]`
    /// or `rm PORT`. Blank lines are skipped and `#` starts a comment. A bad line is reported on
    /// stderr as `line N: MESSAGE`; the summary goes to stderr at the end.
    Apply(ApplyArgs),
    /// Print the routes with their counters; read-only, works beside a running writer.
    Dump(DumpArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help, version and usage errors, printed by clap; a closed pipe stays quiet here too.
        Err(e) => {
            return match e.print() {
                Err(io) if io.kind() == io::ErrorKind::BrokenPipe => {
                    ExitCode::from(CLOSED_PIPE_STATUS)
                }
                _ => ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)),
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Init => {
            Writer::open(&cli.table, LockMode::NoWait)?;
            say(format_args!("route table {} ready", cli.table.display()))
        }
        Cmd::Change(change) => {
            let change = change.check()?;
            let mut w = Writer::open(&cli.table, LockMode::NoWait)?;
            let done = change.apply(&mut w)?;
            say(format_args!("{done}"))
        }
        Cmd::Apply(args) => apply::run(&cli.table, &args),
        Cmd::Dump(args) => {
            let t = Table::open_read_only(&cli.table)?;
            dump::run(&t, &args)
        }
    }
}
