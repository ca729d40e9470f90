//! Accepted lifecycle operations run to completion in their own tasks: a client that drops
//! its connection cancels only its wait for the answer, never the operation.
//!
//! Every operation registers the environment it works on before it claims the row, and
//! deregisters when its task ends; when the task ends with the row still claimed by this
//! process (an early error after the claim), the claim is released so that nothing stays
//! busy. The reconciler treats a row claimed by this process but not registered here as
//! orphaned, exactly like a row claimed by a dead process. Graceful shutdown closes the
//! tracker and waits (bounded) for the operations in flight.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_util::task::TaskTracker;

use crate::db::envs;
use crate::error::ApiError;
use crate::state::State;

/// The operations of this process.
#[derive(Default)]
pub struct Operations {
    tracker: TaskTracker,
    /// Environment ids with an operation running in this process.
    active: Mutex<HashSet<String>>,
    /// False once shutdown began: new operations are refused with a 503.
    closed: AtomicBool,
}

impl Operations {
    /// Runs `op` on environment `env_id` in its own task and waits for its result. The task
    /// finishes even if the caller stops waiting.
    pub async fn run<T, F>(&self, st: &Arc<State>, env_id: &str, op: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the API is shutting down; try another instance".into()));
        }
        if !st.liveness.holding() {
            return Err(ApiError::Unavailable(
                "this instance lost its database liveness lock; try again shortly".into(),
            ));
        }
        {
            let mut active = self.active.lock().await;
            if !active.insert(env_id.to_string()) {
                return Err(ApiError::Conflict(format!("environment {env_id} is busy; try again")));
            }
        }
        let st2 = st.clone();
        let id = env_id.to_string();
        let handle = self.tracker.spawn(async move {
            let out = op.await;
            // Whatever happened, nothing stays claimed by this finished operation.
            if let Err(e) = envs::release_claim(&st2.db, &id, st2.instance).await {
                tracing::warn!(env_id = %id, error = %e, "releasing a finished operation's claim failed; the reconciler will");
            }
            st2.ops.active.lock().await.remove(&id);
            out
        });
        match handle.await {
            Ok(out) => out,
            Err(e) => Err(ApiError::internal("operation task", e)),
        }
    }

    /// Locks the set of running operations (the reconciler holds it while it takes over an
    /// orphaned row, so that no operation claims the row in between).
    pub async fn lock_active(&self) -> MutexGuard<'_, HashSet<String>> {
        self.active.lock().await
    }

    /// Refuses new operations and waits up to `grace` for those in flight; returns whether
    /// all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.closed.store(true, Ordering::Release);
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}

/// Whether this process holds its database liveness lock. Without it, other processes may
/// take over its rows, so it starts no operation and runs no reconcile pass.
#[derive(Default)]
pub struct Liveness(AtomicBool);

impl Liveness {
    /// Whether the lock is held now.
    pub fn holding(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    /// Records whether the lock is held.
    pub fn set(&self, held: bool) {
        self.0.store(held, Ordering::Release);
    }
}
