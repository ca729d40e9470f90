//! The block `gpugate config-ssh` keeps in `~/.ssh/config`: one `Host` per workspace (its name
//! and its id as aliases), reached through `gpugate proxy`, checked strictly against the
//! deployment's SSH host CA in the client's own known_hosts file. Only the lines between the
//! markers are ever changed; a second run with nothing new changes nothing.

use std::path::Path;

/// The first line of the managed block.
pub const BEGIN: &str = "# >>> gpugate: managed by `gpugate config-ssh`; changes inside this block are replaced >>>";
/// Its last line.
pub const END: &str = "# <<< gpugate <<<";

/// One workspace as `~/.ssh/config` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// Aliases users type (`ssh train`): its name and its id.
    pub aliases: Vec<String>,
    /// Its SSH host name (`<id>.ssh.<domain>`), which its certificate names.
    pub host_name: String,
    pub user: String,
    /// The gateway's TLS port, or its pool port when `tcp`.
    pub port: u16,
    /// Reached by pool port (plain TCP) rather than by name over TLS.
    pub tcp: bool,
}

/// Whether `alias` can stand in a `Host` line as itself (no pattern characters, no spaces).
pub fn usable_alias(alias: &str) -> bool {
    !alias.is_empty() && alias.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) && !alias.starts_with('-')
}

/// `p` as one word of an ssh_config line.
pub fn quoted(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// The managed block, markers included; `proxy_options` are added to each ProxyCommand (the
/// gateway's address and CA, so the block does not depend on the environment ssh runs in).
pub fn render(entries: &[HostEntry], exe: &Path, proxy_options: &str, known_hosts: &Path) -> String {
    let mut out = vec![BEGIN.to_string()];
    for e in entries {
        let aliases: Vec<&str> = e.aliases.iter().map(String::as_str).filter(|a| usable_alias(a)).collect();
        if aliases.is_empty() {
            continue;
        }
        out.push(format!("Host {}", aliases.join(" ")));
        out.push(format!("  HostName {}", e.host_name));
        out.push(format!("  User {}", e.user));
        out.push(format!("  Port {}", e.port));
        out.push(format!("  ProxyCommand {} proxy %h --port %p{}{proxy_options}", quoted(exe), if e.tcp { " --tcp" } else { "" }));
        out.push(format!("  UserKnownHostsFile {}", quoted(known_hosts)));
        out.push("  StrictHostKeyChecking yes".to_string());
    }
    out.push(END.to_string());
    out.join("\n") + "\n"
}

/// `existing` with its managed block replaced by `block` (appended, after a blank line, when
/// it has none). A block without its end marker is an error, never a guess.
pub fn merge(existing: &str, block: &str) -> Result<String, String> {
    let lines: Vec<&str> = existing.lines().collect();
    let begin = lines.iter().position(|l| l.trim_end() == BEGIN);
    let Some(begin) = begin else {
        let mut out = existing.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if !out.trim().is_empty() {
            out.push('\n');
        }
        out.push_str(block);
        return Ok(out);
    };
    let end = lines[begin..]
        .iter()
        .position(|l| l.trim_end() == END)
        .map(|i| begin + i)
        .ok_or_else(|| format!("the gpugate block has no end line ({END:?}): mend the file by hand"))?;
    let mut out: Vec<String> = lines[..begin].iter().map(|l| l.to_string()).collect();
    out.extend(block.lines().map(str::to_string));
    out.extend(lines[end + 1..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// A line diff of `old` and `new` (`-` and `+` lines with a little context), empty when equal.
pub fn diff(old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence of lines (files here are small).
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let mut out = vec![];
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+{}", b[j]));
            j += 1;
        } else {
            out.push(format!("-{}", a[i]));
            i += 1;
        }
    }
    // Context: changed lines and two lines around them.
    let changed: Vec<bool> = out.iter().map(|l| !l.starts_with(' ')).collect();
    let keep = |k: usize| (k.saturating_sub(2)..=(k + 2).min(out.len() - 1)).any(|m| changed[m]);
    out.iter().enumerate().filter(|(k, _)| keep(*k)).map(|(_, l)| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, tcp: bool) -> HostEntry {
        HostEntry {
            aliases: vec![name.into(), format!("{name}id")],
            host_name: format!("{name}id.ssh.gpu.example.com"),
            user: "remotegpu".into(),
            port: if tcp { 20417 } else { 443 },
            tcp,
        }
    }

    #[test]
    fn the_block_names_each_workspace_and_checks_strictly() {
        let block = render(&[entry("train", false), entry("eval", true)], Path::new("/usr/bin/gpugate"), "", Path::new("/h/kh"));
        assert!(block.starts_with(BEGIN) && block.trim_end().ends_with(END), "{block}");
        assert!(block.contains("Host train trainid\n  HostName trainid.ssh.gpu.example.com\n  User remotegpu\n  Port 443\n"));
        assert!(block.contains("ProxyCommand \"/usr/bin/gpugate\" proxy %h --port %p\n"));
        assert!(block.contains("ProxyCommand \"/usr/bin/gpugate\" proxy %h --port %p --tcp\n"));
        assert_eq!(block.matches("StrictHostKeyChecking yes").count(), 2);
        assert_eq!(block.matches("UserKnownHostsFile \"/h/kh\"").count(), 2);
    }

    #[test]
    fn names_that_would_be_patterns_are_left_out() {
        for bad in ["", "a b", "a*", "x?", "!x", "-x", "a,b"] {
            assert!(!usable_alias(bad), "{bad:?}");
        }
        let mut e = entry("ok", false);
        e.aliases = vec!["has space".into()];
        assert!(!render(&[e], Path::new("/g"), "", Path::new("/k")).contains("Host "));
    }

    #[test]
    fn merging_replaces_only_the_block_and_is_idempotent() {
        let block = render(&[entry("train", false)], Path::new("/g"), " --gateway 10.0.0.1", Path::new("/k"));
        assert!(block.contains("proxy %h --port %p --gateway 10.0.0.1\n"), "{block}");
        let mine = "Host work\n  User me\n";
        let once = merge(mine, &block).expect("merge");
        assert!(once.starts_with(mine), "{once}");
        assert_eq!(merge(&once, &block).expect("again"), once, "a second run changed the file");
        let changed = render(&[entry("eval", false)], Path::new("/g"), "", Path::new("/k"));
        let after = merge(&format!("{once}Host later\n"), &changed).expect("replace");
        assert!(after.starts_with(mine) && after.ends_with("Host later\n"), "{after}");
        assert!(!after.contains("train") && after.contains("eval"), "{after}");
        assert_eq!(merge("", &block).expect("empty"), block);
    }

    #[test]
    fn a_block_without_its_end_is_refused() {
        let broken = format!("Host a\n{BEGIN}\nHost x\n");
        assert!(merge(&broken, "new\n").unwrap_err().contains("no end line"));
    }

    #[test]
    fn the_diff_shows_what_changes_and_nothing_when_equal() {
        assert_eq!(diff("a\nb\n", "a\nb\n"), "");
        let d = diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert!(d.contains("-b\n") && d.contains("+B\n") && d.contains("+d\n") && d.contains(" a\n"), "{d}");
    }
}
