//! GPU utilisation as activity: before each idle check, every API process samples the GPUs of
//! its own host (by UUID, with the discovery command `gpu.nvidia_smi`) and records the samples
//! in the inventory, where the idle rule of any process reads them ([`crate::idle`]).
//!
//! Sampling is never fatal: a command that fails (missing, timing out, printing something
//! unexpected) is logged once per change of its complaint and counted in
//! `gpugate_gpu_utilization_samples_total{result="failed"}`; the samples it did not renew go
//! stale, and a stale sample is unknown, never busy.

use crate::db::gpus;
use crate::gpu::utilization;
use crate::state::State;

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
                st.metrics.gpu_samples.with_label_values(&["ok"]).inc();
                if self.complaint.take().is_some() {
                    tracing::info!(gpus = n, "GPU utilisation is sampled again");
                }
                n
            }
            Err(e) => {
                st.metrics.gpu_samples.with_label_values(&["failed"]).inc();
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
