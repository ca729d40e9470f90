//! Account keys reach running workspaces without a restart. A workspace's container is brought
//! to its owner's account keys and the deployment's password setting by the image's
//! `gpugate-account-keys` (run inside it by Docker exec, as root), which writes the keys to
//! the file its SSH server reads besides the user's own `authorized_keys`, and turns password
//! login on or off (a reload of sshd, open sessions untouched). It never goes back: a
//! generation older than the one in place is left alone ("stale"), so two processes bringing
//! the same workspace cannot leave it behind.
//!
//! Two paths, both recorded in `environments.account_keys_synced` (cleared for each new
//! container, whose first keys come from its environment at create):
//! - right after an add or a removal, for that user's running workspaces (the answer does not
//!   wait for it);
//! - on every pass of the host prober, for each host that answers: what the first path missed
//!   (a host that did not answer, a process that died, a workspace that was starting, a new
//!   container), bounded per host like the GPU sampling ([`crate::host_exec`]).

use std::collections::HashMap;

use crate::db::account_keys::{self, Unsynced};
use crate::docker::{AccountLogin, DockerClient};
use crate::host_exec::{self, Failure};
use crate::state::{AppState, State};

/// The command in the workspace image.
pub const COMMAND: &str = "gpugate-account-keys";

/// How much of its output is read (it prints one word).
const OUTPUT_LIMIT: usize = 1024;

/// What one workspace's bringing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Brought to the owner's current keys.
    Synced,
    /// A newer state was there already (another process brought it further).
    Stale,
    /// The image has no `gpugate-account-keys`: its account keys wait for a start with a
    /// current image (recorded, so it is not tried on every pass).
    Unsupported,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Synced => "ok",
            Outcome::Stale => "stale",
            Outcome::Unsupported => "unsupported",
        }
    }
}

/// Brings `user_id`'s running workspaces to their keys, in a task of its own (after an add or
/// a removal; the prober's pass retries whatever this misses).
pub fn spawn_for_user(st: &AppState, user_id: i64) {
    let st = st.clone();
    tokio::spawn(async move {
        let mode = st.cfg.docker.password_login.as_str();
        let due = match account_keys::unsynced(&st.db, None, Some(user_id), mode).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(user_id, error = %e, "account keys: listing the user's workspaces failed; the host prober retries");
                return;
            }
        };
        let mut by_host: HashMap<String, Vec<Unsynced>> = HashMap::new();
        for w in due {
            by_host.entry(w.host.clone()).or_default().push(w);
        }
        let hosts = by_host.into_iter().map(|(host, due)| {
            let st = &st;
            async move {
                match st.fleet.client(&host).await {
                    Ok(client) => {
                        sync_all(st, &host, &client, due).await;
                    }
                    Err(e) => tracing::warn!(host, error = %e, "account keys: the host's engine is not reachable; the host prober retries"),
                }
            }
        });
        futures_util::future::join_all(hosts).await;
    });
}

/// Brings every workspace of `host` (reached through `client`) that lacks its owner's current
/// keys (the host prober's pass); returns how many were brought.
pub async fn sync_host(st: &State, host: &str, client: &DockerClient) -> anyhow::Result<u64> {
    let due = account_keys::unsynced(&st.db, Some(host), None, st.cfg.docker.password_login.as_str()).await?;
    Ok(sync_all(st, host, client, due).await)
}

async fn sync_all(st: &State, host: &str, client: &DockerClient, due: Vec<Unsynced>) -> u64 {
    if due.is_empty() {
        return 0;
    }
    let pass = host_exec::bounded(due, host_exec::budget(st.cfg.docker.call_timeout_s), |w| async move {
        let got = sync_one(st, client, &w).await;
        (w.env_id, got)
    })
    .await;
    if pass.out_of_budget {
        tracing::warn!(host, "account keys: the host's workspaces took the whole budget; the rest come at the next probe");
    }
    let mut synced = 0;
    for (env_id, got) in pass.results {
        match got {
            Ok(outcome) => {
                st.metrics.account_key_syncs.with_label_values(&[outcome.label()]).inc();
                match outcome {
                    Outcome::Synced => synced += 1,
                    Outcome::Stale => {}
                    Outcome::Unsupported => tracing::warn!(
                        env_id, host,
                        "account keys: the workspace's image has no {COMMAND}; its account keys and password setting change at its next start with a current image"
                    ),
                }
            }
            Err(Failure::EngineUnavailable(e)) => {
                tracing::warn!(host, error = %e, "account keys: the host's engine stopped answering; the rest come at the next probe");
            }
            Err(Failure::Workspace(e)) => {
                st.metrics.account_key_syncs.with_label_values(&["failed"]).inc();
                tracing::warn!(env_id, host, error = %e, "account keys: bringing the workspace failed; retried at the next probe");
            }
        }
    }
    synced
}

/// The owner's account keys as of their current generation and whether the password logs in
/// with them (what a new container starts with, and what a running one is brought to).
pub async fn current(st: &State, owner: i64) -> Result<AccountLogin, sqlx::Error> {
    let (generation, keys) = account_keys::current(st.db.pool(), owner).await?;
    let password_login = st.cfg.docker.password_login.allows(keys.len());
    Ok(AccountLogin { generation, keys, password_login })
}

/// Runs the command in `w`'s container with its owner's current keys; records the state it
/// reached.
async fn sync_one(st: &State, client: &DockerClient, w: &Unsynced) -> Result<Outcome, Failure> {
    let account = current(st, w.owner_id).await.map_err(|e| format!("reading the owner's keys: {e}"))?;
    let mut cmd = vec![COMMAND.to_string(), account.generation.to_string(), account.password_word().to_string()];
    cmd.extend(account.keys.iter().cloned());
    let out = client.exec_output(&w.container_id, Some("root"), &cmd, OUTPUT_LIMIT).await?;
    let outcome = match (out.exit_code, out.stdout.trim()) {
        (Some(0), "ok") => Outcome::Synced,
        (Some(0), "stale") => return Ok(Outcome::Stale),
        // The shell's "command not found" (an image from before account keys).
        (Some(126 | 127), _) => Outcome::Unsupported,
        (code, said) => {
            let code = code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
            return Err(format!("{COMMAND} failed in the workspace ({code}): {said:?}").into());
        }
    };
    let mark = account_keys::mark(account.generation, st.cfg.docker.password_login.as_str());
    account_keys::mark_synced(&st.db, &w.env_id, &w.container_id, &mark)
        .await
        .map_err(|e| format!("recording the workspace's keys: {e}"))?;
    Ok(outcome)
}
