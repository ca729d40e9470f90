//! GPU utilisation as activity: before each idle check, every API process samples the GPUs of
//! its own host (by UUID, with the discovery command `gpu.nvidia_smi`) and records the samples
//! in the inventory, where the idle rule of any process reads them ([`crate::idle`]).
//!
//! GPUs no API process samples that way (on a host without an API process of its own, or
//! listed by index, with no UUID to match) are sampled by the host prober
//! ([`crate::host_health`]) from inside each GPU workspace whose samples are older than one
//! and a half idle checks: `gpu.workspace_nvidia_smi` run there sees exactly that
//! workspace's GPUs. What it prints is the workspace user's to forge, so it can only ever
//! speak for that workspace's own GPUs: by UUID where the inventory knows them (any other UUID
//! refuses the sample), by position otherwise, and only when it lists as many GPUs as the
//! workspace holds.
//!
//! Sampling is never fatal: a command that fails (missing, timing out, printing something
//! unexpected) is logged once per change of its complaint and counted in
//! `gpugate_gpu_utilization_samples_total{result="failed"}` (`source` `host` or `workspace`);
//! the samples it did not renew go stale, and a stale sample is unknown, never busy.

use std::collections::HashMap;

use crate::db::gpus::{self, Unsampled};
use crate::docker::DockerClient;
use crate::host_exec::{self, Failure};
use crate::gpu::utilization::{self, Sample, QUERY_ARGS};
use crate::state::State;

/// How much of the workspace command's output is read (a GPU's line is under 100 bytes).
const WORKSPACE_OUTPUT_LIMIT: usize = 16 * 1024;

/// Samples this host's GPUs, remembering the last complaint so each is logged once.
#[derive(Debug, Default)]
pub struct Sampler {
    complaint: Option<String>,
}

impl Sampler {
    /// Takes one sample of this host's GPUs and records it; returns how many GPUs took one.
    pub async fn sample(&mut self, st: &State) -> u64 {
        let Some(read) = utilization::read(&st.fleet.local().gpu().source).await else {
            return 0;
        };
        let recorded = match read {
            Ok(samples) => {
                let rows: Vec<(String, Option<u8>, bool)> = samples
                    .into_iter()
                    .map(|s| {
                        let busy = s.percent.is_some_and(|p| st.cfg.idle.gpu_busy(p));
                        (s.uuid, s.percent, busy)
                    })
                    .collect();
                gpus::record_utilization(&st.db, st.fleet.local_name(), &rows)
                    .await
                    .map_err(|e| format!("recording GPU utilisation samples failed: {e}"))
            }
            Err(e) => Err(format!("sampling GPU utilisation failed: {e}")),
        };
        match recorded {
            Ok(n) => {
                st.metrics.gpu_samples.with_label_values(&["host", "ok"]).inc();
                if self.complaint.take().is_some() {
                    tracing::info!(gpus = n, "GPU utilisation is sampled again");
                }
                n
            }
            Err(e) => {
                st.metrics.gpu_samples.with_label_values(&["host", "failed"]).inc();
                if self.complaint.as_deref() != Some(e.as_str()) {
                    tracing::warn!(
                        error = %e,
                        "GPU utilisation unknown on this host: its GPUs do not count as busy until sampling works again"
                    );
                    self.complaint = Some(e);
                }
                0
            }
        }
    }
}

/// Samples GPU workspaces from inside, for the host prober; remembers each workspace's last
/// complaint so that a broken (or forged) output is logged once per change, not every pass.
#[derive(Debug, Default)]
pub struct WorkspaceSampler {
    /// Last complaint per workspace, with its host.
    complaints: HashMap<String, (String, String)>,
}

impl WorkspaceSampler {
    /// Samples the GPU workspaces of `host` (reached through `client`) whose GPUs no sample
    /// younger than one and a half idle checks covers (a host's own sampler renews its GPUs
    /// every check, so they are left to it); returns how many GPUs took a sample.
    pub async fn sample_host(&mut self, st: &State, host: &str, client: &DockerClient) -> anyhow::Result<u64> {
        if st.cfg.gpu.workspace_nvidia_smi.is_empty() {
            return Ok(0);
        }
        let due = gpus::unsampled_on_host(&st.db, host, st.cfg.idle.check_interval_s as f64 * 1.5).await?;
        // A complaint about a workspace that is no longer due (sampled, stopped, deleted) is
        // forgotten; one of another host is not this pass's to judge.
        let hosts_workspaces: std::collections::HashSet<&str> = due.iter().map(|w| w.env_id.as_str()).collect();
        self.complaints.retain(|env_id, (of_host, _)| of_host != host || hosts_workspaces.contains(env_id.as_str()));
        let cmd: Vec<String> =
            st.cfg.gpu.workspace_nvidia_smi.iter().cloned().chain(QUERY_ARGS.iter().map(|a| a.to_string())).collect();
        let pass = host_exec::bounded(due, host_exec::budget(st.cfg.docker.call_timeout_s), |w| {
            let cmd = &cmd;
            async move {
                let got = sample_workspace(st, host, client, cmd, &w).await;
                (w.env_id, got)
            }
        })
        .await;
        if pass.out_of_budget {
            tracing::warn!(host, "sampling the host's GPU workspaces took its whole budget; the rest come first at the next probe");
        }
        let mut sampled = 0;
        for (env_id, got) in pass.results {
            match got {
                Ok(n) => {
                    st.metrics.gpu_samples.with_label_values(&["workspace", "ok"]).inc();
                    sampled += n;
                    if self.complaints.remove(&env_id).is_some() {
                        tracing::info!(env_id, host, "GPU utilisation of the workspace is sampled again");
                    }
                }
                Err(Failure::EngineUnavailable(e)) => {
                    tracing::warn!(host, error = %e, "the host's engine stopped answering while its GPU workspaces were sampled");
                }
                Err(Failure::Workspace(e)) => {
                    st.metrics.gpu_samples.with_label_values(&["workspace", "failed"]).inc();
                    if self.complaints.get(&env_id).map(|(_, said)| said) != Some(&e) {
                        tracing::warn!(
                            env_id, host, error = %e,
                            "GPU utilisation of the workspace unknown: its GPUs do not count as busy until sampling works again"
                        );
                        self.complaints.insert(env_id, (host.to_string(), e));
                    }
                }
            }
        }
        Ok(sampled)
    }
}

/// Runs the utilisation command in `w`'s container and records what it says of `w`'s GPUs.
async fn sample_workspace(st: &State, host: &str, client: &DockerClient, cmd: &[String], w: &Unsampled) -> Result<u64, Failure> {
    let out = client.exec_output(&w.container_id, None, cmd, WORKSPACE_OUTPUT_LIMIT).await?;
    if out.truncated {
        return Err(format!("`{}` printed more than {WORKSPACE_OUTPUT_LIMIT} bytes", cmd.join(" ")).into());
    }
    if out.exit_code != Some(0) {
        let code = out.exit_code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
        return Err(format!("`{}` failed in the workspace ({code})", cmd.join(" ")).into());
    }
    let samples = utilization::parse(&out.stdout).map_err(|e| format!("`{}` printed {e}", cmd.join(" ")))?;
    let matched = match_samples(&w.gpus, samples)?;
    let rows: Vec<(String, Option<u8>, bool)> = matched
        .into_iter()
        .map(|(id, percent)| {
            let busy = percent.is_some_and(|p| st.cfg.idle.gpu_busy(p));
            (id, percent, busy)
        })
        .collect();
    Ok(gpus::record_env_utilization(&st.db, host, &w.env_id, &rows)
        .await
        .map_err(|e| format!("recording the samples failed: {e}"))?)
}

/// Pairs what a workspace reported with the GPUs it holds (`held`: inventory keys by index):
/// by UUID when every key is one, else by position; anything that does not fit exactly is
/// refused, never guessed (a forged line must not speak for a GPU the workspace lacks).
fn match_samples(held: &[String], samples: Vec<Sample>) -> Result<Vec<(String, Option<u8>)>, String> {
    if samples.len() != held.len() {
        return Err(format!("the workspace reported {} GPUs; it holds {}", samples.len(), held.len()));
    }
    let by_uuid = held.iter().all(|k| k.starts_with("GPU-"));
    if !by_uuid {
        return Ok(held.iter().cloned().zip(samples.into_iter().map(|s| s.percent)).collect());
    }
    let mut out = Vec::with_capacity(held.len());
    for s in samples {
        if !held.contains(&s.uuid) {
            return Err(format!("the workspace reported GPU {}, which it does not hold", s.uuid));
        }
        if out.iter().any(|(k, _): &(String, Option<u8>)| *k == s.uuid) {
            return Err(format!("the workspace reported GPU {} twice", s.uuid));
        }
        out.push((s.uuid, s.percent));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(uuid: &str, percent: Option<u8>) -> Sample {
        Sample { uuid: uuid.into(), percent }
    }

    const A: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000000";
    const B: &str = "GPU-bbbbbbbb-1111-4111-8111-111111111111";
    const C: &str = "GPU-cccccccc-2222-4222-8222-222222222222";

    #[test]
    fn samples_speak_only_for_the_workspaces_own_gpus() {
        let held = vec![A.to_string(), B.to_string()];
        let got = match_samples(&held, vec![sample(B, Some(90)), sample(A, None)]).expect("matched by UUID");
        assert_eq!(got, vec![(B.to_string(), Some(90)), (A.to_string(), None)]);
        let forged = match_samples(&held, vec![sample(A, Some(0)), sample(C, Some(0))]).expect_err("another's GPU");
        assert!(forged.contains(C), "{forged}");
        let twice = match_samples(&held, vec![sample(A, Some(0)), sample(A, Some(99))]).expect_err("twice");
        assert!(twice.contains("twice"), "{twice}");
        let short = match_samples(&held, vec![sample(A, Some(0))]).expect_err("one of two");
        assert!(short.contains("reported 1 GPUs; it holds 2"), "{short}");
    }

    #[test]
    fn gpus_listed_by_index_are_matched_by_position() {
        let held = vec!["index:3".to_string(), "index:5".to_string()];
        let got = match_samples(&held, vec![sample(C, Some(7)), sample(A, Some(95))]).expect("by position");
        assert_eq!(got, vec![("index:3".to_string(), Some(7)), ("index:5".to_string(), Some(95))]);
        assert!(match_samples(&held, vec![]).is_err(), "nothing reported is no sample");
    }
}
