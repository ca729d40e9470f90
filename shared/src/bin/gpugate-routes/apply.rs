//! `apply`: a stream of changes under one writer lock, one `set`/`rm` per line in the syntax of
//! the single commands, each applied as it is read (so `apply -` serves a script as a session).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{ArgMatches, Args, ColorChoice, Command, CommandFactory, FromArgMatches, Parser};
use gpugate_routes::{LockMode, Writer};

use crate::change::Change;
use crate::out::{warn, Failure};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The file of changes; `-` (the default) reads stdin.
    #[arg(value_name = "FILE|-", default_value = "-")]
    file: PathBuf,
    /// Report a bad line and go on with the next one (the exit status is still 1).
    #[arg(long, conflicts_with = "stop_on_error")]
    keep_going: bool,
    /// Stop at the first bad line; later lines are not read (the default).
    #[arg(long)]
    stop_on_error: bool,
    /// Answer each change line on stdout, flushed at once: `ok N` when line N was applied,
    /// `error N: MESSAGE` when it was not.
    #[arg(long)]
    echo: bool,
}

/// One line of `apply`: a change, without the program name or the global options.
#[derive(Parser, Debug)]
#[command(no_binary_name = true)]
struct Line {
    #[command(subcommand)]
    change: Change,
}

/// Parses lines with the clap definitions of the single commands, built once for the stream.
pub struct LineParser {
    cmd: Command,
}

impl LineParser {
    pub fn new() -> LineParser {
        let cmd = Line::command()
            .color(ColorChoice::Never)
            .disable_help_subcommand(true)
            .mut_subcommands(|s| s.disable_help_flag(true));
        LineParser { cmd }
    }

    /// The change on `line`, or `None` for a blank or comment-only line. `#` starts a comment
    /// that runs to the end of the line; words are separated by spaces or tabs (no values
    /// contain either, so there is no quoting).
    pub fn parse(&mut self, line: &str) -> Result<Option<Change>, String> {
        let code = line.split_once('#').map_or(line, |(code, _)| code);
        let words: Vec<&str> = code.split_whitespace().collect();
        if words.is_empty() {
            return Ok(None);
        }
        let matches: ArgMatches =
            self.cmd.try_get_matches_from_mut(words).map_err(|e| one_line(&e))?;
        let parsed = Line::from_arg_matches(&matches).map_err(|e| one_line(&e))?;
        Ok(Some(parsed.change))
    }
}

/// clap's message without its `error:` prefix, usage and tips, on one line (it names the
/// missing argument on the lines after the first, so those are kept).
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start().strip_prefix("error:").unwrap_or(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    lines.join(" ")
}

/// Applies the changes of `args.file` to the table at `table`.
pub fn run(table: &Path, args: &ApplyArgs) -> Result<(), Failure> {
    // The input opens first: a missing file takes no lock and creates no table.
    let input: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(io::stdin().lock())
    } else {
        let f = File::open(&args.file)
            .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
        Box::new(BufReader::new(f))
    };
    let started = Instant::now();
    let mut w = Writer::open(table, LockMode::NoWait)?;
    let mut session =
        Session { w: &mut w, parser: LineParser::new(), echo: args.echo, last_beat: std::time::Instant::now() };
    let (applied, failed) = session.apply_all(input, &args.file, args.keep_going)?;
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { applied as f64 / secs } else { 0.0 };
    warn(format_args!("applied {applied}, failed {failed}, in {secs:.3} s ({rate:.0} changes/s)"));
    if failed > 0 {
        return Err(Failure::Reported);
    }
    Ok(())
}

struct Session<'w> {
    w: &'w mut Writer,
    /// When the writer last checked its files and beat (at most every 100 ms, not per line).
    last_beat: std::time::Instant,
    parser: LineParser,
    echo: bool,
}

impl Session<'_> {
    /// Reads and applies line after line; returns (applied, failed).
    fn apply_all(
        &mut self,
        mut input: Box<dyn BufRead>,
        name: &Path,
        keep_going: bool,
    ) -> Result<(u64, u64), Failure> {
        let (mut applied, mut failed) = (0u64, 0u64);
        let mut out = io::stdout().lock();
        let mut buf = Vec::new();
        let mut n = 0u64;
        loop {
            buf.clear();
            let read = match input.read_until(b'\n', &mut buf) {
                Ok(read) => read,
                // Counted as a failure, so the summary still says what was applied before.
                Err(e) => {
                    let from = if name.as_os_str() == "-" {
                        "stdin".to_owned()
                    } else {
                        name.display().to_string()
                    };
                    let at = if n == 0 { String::new() } else { format!(" after line {n}") };
                    warn(format_args!("gpugate-routes: cannot read {from}{at}: {e}"));
                    return Ok((applied, failed + 1));
                }
            };
            if read == 0 {
                return Ok((applied, failed));
            }
            n += 1;
            match self.line(&buf) {
                Ok(false) => {}
                Ok(true) => {
                    applied += 1;
                    if self.echo {
                        writeln!(out, "ok {n}")
                            .and_then(|()| out.flush())
                            .map_err(Failure::stdout)?;
                    }
                }
                Err(msg) => {
                    failed += 1;
                    warn(format_args!("line {n}: {msg}"));
                    if self.echo {
                        writeln!(out, "error {n}: {msg}")
                            .and_then(|()| out.flush())
                            .map_err(Failure::stdout)?;
                    }
                    if !keep_going {
                        warn(format_args!("stopped at line {n} (--keep-going skips bad lines)"));
                        return Ok((applied, failed));
                    }
                }
            }
        }
    }

    /// Applies one line; `Ok(false)` for a line with no change on it.
    fn line(&mut self, bytes: &[u8]) -> Result<bool, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the line is not UTF-8".to_owned())?;
        let Some(change) = self.parser.parse(text)? else {
            return Ok(false);
        };
        change.check()?.apply(self.w)?;
        if self.last_beat.elapsed() >= std::time::Duration::from_millis(100) {
            // Also checks that the table is still the file this writer holds.
            self.w.heartbeat().map_err(|e| e.to_string())?;
            self.last_beat = std::time::Instant::now();
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::LineParser;

    fn parse(line: &str) -> Result<Option<String>, String> {
        LineParser::new().parse(line).map(|c| c.map(|c| format!("{c:?}")))
    }

    #[test]
    fn lines_use_the_single_command_syntax() {
        let set = parse("set 20417 10.0.0.7:22 --env ab12 --service ssh --ttl 60 --generation 9")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_default();
        for part in ["port: 20417", "10.0.0.7:22", "\"ab12\"", "\"ssh\"", "Some(60)", "Some(9)"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        let rm =
            parse("\trm   20417  # gone\r\n").unwrap_or_else(|e| panic!("{e}")).unwrap_or_default();
        assert!(rm.starts_with("Rm") && rm.contains("20417"), "{rm}");
    }

    #[test]
    fn blank_and_comment_lines_are_no_change() {
        for line in ["", "\n", "   \t", "# a comment", "   # indented"] {
            assert_eq!(parse(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn bad_lines_get_one_line_messages() {
        for (line, says) in [
            ("sett 1 127.0.0.1:22", "unrecognized subcommand 'sett'"),
            ("dump", "unrecognized subcommand 'dump'"),
            ("set 1", "<UPSTREAM>"),
            ("set x 127.0.0.1:22", "invalid value 'x' for '<PORT>'"),
            ("set 1 127.0.0.1:22 --table /x", "unexpected argument '--table'"),
            ("set 1 nowhere", "invalid value 'nowhere' for '<UPSTREAM>'"),
            ("rm 1 --help", "unexpected argument '--help'"),
        ] {
            let msg = parse(line).expect_err(line);
            assert!(msg.contains(says), "{line:?}: {msg:?} lacks {says:?}");
            assert!(!msg.contains('\n') && !msg.starts_with("error"), "{line:?}: {msg:?}");
        }
    }
}
