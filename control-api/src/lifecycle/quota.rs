//! Quota checks: a create or start that would take a user past a limit is refused (409,
//! code 1011) with a message naming the limit, before anything changes.

use crate::config::QuotaConfig;
use crate::db::quotas::{Overrides, Usage};
use crate::error::ApiError;

/// What the operation adds to the user's usage.
#[derive(Debug, Clone, Copy)]
pub struct Adds {
    /// Environments (1 for a create).
    pub environments: u32,
    /// GPUs.
    pub gpus: u32,
    /// Environments creating or running (1 for a create or start).
    pub running: u32,
}

/// Checks `adds` on top of `usage` against the user's overrides, else the defaults.
pub fn check(user: &str, defaults: &QuotaConfig, o: Overrides, usage: Usage, adds: Adds) -> Result<(), ApiError> {
    let limits = [
        ("environments", o.environments.or(defaults.environments), usage.environments, adds.environments),
        ("GPUs", o.gpus.or(defaults.gpus), usage.gpus, adds.gpus),
        ("running environments", o.running.or(defaults.running), usage.running, adds.running),
    ];
    for (what, limit, used, add) in limits {
        let Some(limit) = limit else { continue };
        if add > 0 && used.saturating_add(add) > limit {
            return Err(ApiError::QuotaExceeded(format!(
                "quota exceeded: {what} {used} in use + {add} requested > {limit} allowed for user {user}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_defaults_and_none_means_unlimited() {
        let d = QuotaConfig { environments: Some(2), gpus: Some(1), running: None };
        let used = Usage { environments: 1, gpus: 1, running: 5 };
        let create = Adds { environments: 1, gpus: 0, running: 1 };
        assert!(check("a", &d, Overrides::default(), used, create).is_ok());
        let err = check("a", &d, Overrides::default(), used, Adds { gpus: 1, ..create }).expect_err("gpus");
        assert!(err.to_string().contains("GPUs 1 in use + 1 requested > 1 allowed"), "{err}");
        let used = Usage { environments: 2, ..used };
        assert!(check("a", &d, Overrides::default(), used, create).expect_err("envs").to_string().contains("environments"));
        let more = Overrides { environments: Some(3), ..Overrides::default() };
        assert!(check("a", &d, more, used, create).is_ok());
        let few = Overrides { running: Some(5), ..more };
        assert!(check("a", &d, few, used, create).expect_err("running").to_string().contains("running environments"));
    }
}
