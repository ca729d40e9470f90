//! One command in many workspaces of one host, as the host prober runs it (GPU sampling inside
//! workspaces, account keys): a few at a time, the whole of it within a budget, and stopped at
//! the first call the host's engine does not answer, so one slow host cannot hold up the
//! probes of the others. Workspaces left out come first at the next pass (callers order them).

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;

use crate::docker::DockerError;

/// How many workspaces of one host are worked on at a time.
pub const CONCURRENCY: usize = 8;

/// How many Docker call time-outs one host's work may take in a probe pass.
pub const BUDGET_CALLS: u32 = 2;

/// Why the command gave nothing for one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The host's engine did not answer: the host's work stops for this pass.
    EngineUnavailable(String),
    /// This workspace's command or what it printed.
    Workspace(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Workspace(e)
    }
}

impl From<DockerError> for Failure {
    fn from(e: DockerError) -> Self {
        match e {
            DockerError::Timeout(_) | DockerError::Connect(_) => Failure::EngineUnavailable(e.to_string()),
            other => Failure::Workspace(other.to_string()),
        }
    }
}

/// What a bounded pass got: each finished workspace's key and result, in the order they
/// finished, and whether the budget ran out first.
pub struct Pass<K, R> {
    pub results: Vec<(K, Result<R, Failure>)>,
    pub out_of_budget: bool,
}

/// Runs `work` over `items` ([`CONCURRENCY`] at a time) for at most `budget`, stopping at the
/// first [`Failure::EngineUnavailable`].
pub async fn bounded<T, K, R, F, Fut>(items: Vec<T>, budget: Duration, work: F) -> Pass<K, R>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = (K, Result<R, Failure>)>,
{
    let mut results = vec![];
    let mut stream = futures_util::stream::iter(items).map(work).buffer_unordered(CONCURRENCY);
    let collect = async {
        while let Some((key, got)) = stream.next().await {
            let unavailable = matches!(got, Err(Failure::EngineUnavailable(_)));
            results.push((key, got));
            if unavailable {
                break;
            }
        }
    };
    let out_of_budget = tokio::time::timeout(budget, collect).await.is_err();
    Pass { results, out_of_budget }
}

/// The budget of one host's work in a pass: [`BUDGET_CALLS`] Docker call time-outs.
pub fn budget(call_timeout_s: u64) -> Duration {
    Duration::from_secs(call_timeout_s.max(1)) * BUDGET_CALLS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pass_stops_at_the_first_engine_that_does_not_answer() {
        let items: Vec<u32> = (0..40).collect();
        let pass = bounded(items, Duration::from_secs(5), |i| async move {
            if i == 3 {
                (i, Err(Failure::EngineUnavailable("no answer".into())))
            } else {
                (i, Ok(i))
            }
        })
        .await;
        assert!(!pass.out_of_budget);
        assert!(pass.results.len() < 40, "went on past the engine that did not answer");
        assert!(matches!(pass.results.last(), Some((3, Err(Failure::EngineUnavailable(_))))));
    }

    #[tokio::test]
    async fn a_pass_ends_at_its_budget() {
        let items: Vec<u32> = (0..4).collect();
        let pass = bounded(items, Duration::from_millis(100), |i| async move {
            if i == 0 {
                (i, Ok(()))
            } else {
                tokio::time::sleep(Duration::from_secs(30)).await;
                (i, Ok(()))
            }
        })
        .await;
        assert!(pass.out_of_budget);
        assert_eq!(pass.results.len(), 1);
    }
}
