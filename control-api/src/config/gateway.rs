//! The gateway's identity in the registry: its name (default: the host name) and how often
//! its publisher reports.

/// Where Linux keeps the host name (read without a system call wrapper: the crate has no
/// unsafe code).
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The default heartbeat interval of the gateway registry (ms).
pub const DEFAULT_HEARTBEAT_MS: u64 = 2000;

/// The default interval of the publisher's activity reports (ms).
pub const DEFAULT_ACTIVITY_REPORT_MS: u64 = 1000;

/// The allowed activity report intervals (ms; 0 turns reporting off): activity must reach
/// the API within seconds, and each report is one small transaction.
pub const ACTIVITY_REPORT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=60_000;

/// The allowed heartbeat intervals (ms): often enough to notice a dead gateway within
/// seconds, not so often that a fleet of them loads the database.
pub const HEARTBEAT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=300_000;

/// The machine's host name, or an empty string when it cannot be read (then validation asks
/// for `gateway_name`).
pub fn default_name() -> String {
    std::fs::read_to_string(HOSTNAME_FILE).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Checks a gateway name: 1 to 63 characters of `A-Z a-z 0-9 . _ -` (it is a metrics label
/// and a database key; the migration's CHECK says the same).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty (and the host name could not be read)".into());
    }
    if name.len() > 63 {
        let head: String = name.chars().take(20).collect();
        return Err(format!("\"{}…\" is {} bytes long; at most 63", head.escape_default(), name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("\"{}\" has {c:?}; use only letters, digits, '.', '_' and '-'", name.escape_default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_plain_labels() {
        for good in ["gw-a", "gw_b.example.com", "A1", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "gw a", "gw/a", "gw:a", "gwé", &"x".repeat(64), "gw\n"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_is_the_host_name() {
        let name = default_name();
        assert!(check_name(&name).is_ok(), "this machine's host name {name:?} is not a valid gateway name");
    }
}
