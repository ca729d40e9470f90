//! The readiness log: the last raw error logged per dependency, so each `/readyz` failure is
//! logged once per change (below `http/`, so the state that holds it imports no handler).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The last raw error logged per dependency, so `/readyz` logs each failure once per change
/// instead of once per probe.
#[derive(Default)]
pub struct ReadyLog(Mutex<BTreeMap<&'static str, String>>);

impl ReadyLog {
    /// Records the state of `dependency`: logs a new or changed error at warn, a recovery at
    /// info, and nothing while it stays the same.
    pub(crate) fn note(&self, dependency: &'static str, error: Option<String>) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => {
                if last.get(dependency) != Some(&e) {
                    tracing::warn!(dependency, error = %e, "not ready");
                    last.insert(dependency, e);
                }
            }
            None => {
                if last.remove(dependency).is_some() {
                    tracing::info!(dependency, "ready again");
                }
            }
        }
    }
}
