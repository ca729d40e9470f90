//! Accepted lifecycle operations run to completion in their own tasks: a client that drops
//! its connection cancels only its wait for the answer, never the operation.
//!
//! Every operation registers the environment it works on before it claims the row, and
//! deregisters when its task ends; when the task ends with the row still claimed by this
//! process (an early error after the claim), the claim is released so that nothing stays
//! busy. The reconciler treats a row claimed by this process but not registered here as
//! orphaned, exactly like a row claimed by a dead process. Graceful shutdown closes the
//! tracker and waits (bounded) for the operations in flight.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};
use tokio_util::task::TaskTracker;

use crate::db::{envs, Db};
use crate::error::ApiError;

/// The operations of this process.
pub struct Operations {
    /// The database, where a finished operation's claim is released.
    db: Db,
    /// This process's instance id (the claims it holds carry it).
    instance: i64,
    /// Whether this process holds its liveness lock (no operation starts without it).
    liveness: Arc<Liveness>,
    tracker: TaskTracker,
    /// Environment ids with an operation running in this process.
    active: Arc<Mutex<HashSet<String>>>,
    /// False once shutdown began: new operations are refused with a 503.
    closed: AtomicBool,
    /// One queue per user for the transactions that lock the user's row (quota checks): a
    /// burst of one user's creates waits here, not holding database connections while it
    /// waits for the row lock (which would starve every other request of the pool).
    users: std::sync::Mutex<HashMap<i64, Arc<Mutex<()>>>>,
}

impl Operations {
    /// No operation yet, for the process with instance id `instance` and its liveness lock.
    pub fn new(db: Db, instance: i64, liveness: Arc<Liveness>) -> Operations {
        Operations {
            db,
            instance,
            liveness,
            tracker: TaskTracker::default(),
            active: Arc::default(),
            closed: AtomicBool::default(),
            users: std::sync::Mutex::default(),
        }
    }

    /// Runs `op` on environment `env_id` in its own task and waits for its result. The task
    /// finishes even if the caller stops waiting.
    pub async fn run<T, F>(&self, env_id: &str, op: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the API is shutting down; try another instance".into()));
        }
        if !self.liveness.holding() {
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
        let (db, instance, active) = (self.db.clone(), self.instance, self.active.clone());
        let id = env_id.to_string();
        let handle = self.tracker.spawn(async move {
            let out = op.await;
            // Whatever happened, nothing stays claimed by this finished operation.
            if let Err(e) = envs::release_claim(&db, &id, instance).await {
                tracing::warn!(env_id = %id, error = %e, "releasing a finished operation's claim failed; the reconciler will");
            }
            active.lock().await.remove(&id);
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

    /// Waits for `user`'s turn to lock their row in this process (see `users`); the turn lasts
    /// as long as the guard.
    pub async fn user_turn(&self, user: i64) -> OwnedMutexGuard<()> {
        let queue = {
            let mut all = self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Queues nobody waits on go, so the map stays as small as the users active now.
            all.retain(|_, q| Arc::strong_count(q) > 1);
            all.entry(user).or_default().clone()
        };
        queue.lock_owned().await
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
