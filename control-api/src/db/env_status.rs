//! An environment's lifecycle status (the `status` column) and the moves between statuses it
//! may make: the one place that says which transition is allowed. Every status write of an
//! operation ([`super::envs::claim`], [`super::envs::settle`]) moves only from a status this
//! table allows, in its SQL, so a stale or mistaken caller changes nothing.

use std::fmt;

/// What the API reports as an environment's `status`, and what the database stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = EnvironmentStatus)]
pub enum Status {
    /// Ports allocated, container being made.
    Creating,
    /// Container running, routes live.
    Running,
    /// Being stopped: routes disabled, sessions being closed, container stopping; still holds
    /// its GPUs and counts as running for quotas.
    Stopping,
    /// Container stopped, routes disabled; ports and home volume kept, GPUs given back.
    Stopped,
    /// Being started (from `stopped` or `failed`): a new container over the same home; counts
    /// as running for quotas.
    Starting,
    /// Routes and container being removed.
    Deleting,
    /// The container vanished or its host was lost; routes removed, ports and home volume
    /// kept. A start recovers it (a new container over the same home).
    Failed,
    /// Gone; ports released (in quarantine), home removed.
    Deleted,
    /// Its host stopped answering: routes kept for a grace period (`fleet.fail_after_s`),
    /// then `failed`; back to `running` if the host answers again first.
    Unreachable,
}

use Status::*;

/// The statuses whose container runs or may run, as an SQL list: they count as running for
/// quotas and occupy a place under a host's `max_environments`.
pub const OCCUPYING_SQL: &str = "('creating', 'starting', 'running', 'stopping', 'unreachable')";

/// Every allowed move, `(from, to)`. A create inserts `creating`; nothing leaves `deleted`.
const TRANSITIONS: &[(Status, Status)] = &[
    // create: made, undone, or deleted while it was being made
    (Creating, Running),
    (Creating, Deleted),
    (Creating, Deleting),
    // stop (by its owner or the idle task), then delete
    (Running, Stopping),
    (Stopping, Stopped),
    (Running, Deleting),
    (Stopping, Deleting),
    (Stopped, Deleting),
    (Failed, Deleting),
    (Unreachable, Deleting),
    (Deleting, Deleted),
    // start (a failed one recovers the same way), and its undo back to where it came from
    (Stopped, Starting),
    (Failed, Starting),
    (Starting, Running),
    (Starting, Stopped),
    (Starting, Failed),
    // a container that vanished; a host that stopped answering, came back or was given up
    (Running, Failed),
    (Stopped, Failed),
    (Running, Unreachable),
    (Unreachable, Running),
    (Unreachable, Failed),
];

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 9] = [Creating, Running, Stopping, Stopped, Starting, Deleting, Failed, Deleted, Unreachable];

    /// The stored (and reported) word.
    pub const fn as_str(self) -> &'static str {
        match self {
            Creating => "creating",
            Running => "running",
            Stopping => "stopping",
            Stopped => "stopped",
            Starting => "starting",
            Deleting => "deleting",
            Failed => "failed",
            Deleted => "deleted",
            Unreachable => "unreachable",
        }
    }

    /// Whether an environment in `self` may move to `to`.
    pub fn may_become(self, to: Status) -> bool {
        TRANSITIONS.contains(&(self, to))
    }

    /// The statuses an environment may reach `self` from, as stored words (an SQL array).
    pub fn sources(self) -> Vec<&'static str> {
        TRANSITIONS.iter().filter(|(_, to)| *to == self).map(|(from, _)| from.as_str()).collect()
    }

    /// Whether an operation is under way (its claim must finish or be undone).
    pub fn is_transient(self) -> bool {
        matches!(self, Creating | Deleting | Stopping | Starting)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Status, String> {
        Status::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown environment status {s:?}"))
    }
}

impl TryFrom<String> for Status {
    type Error = String;

    fn try_from(s: String) -> Result<Status, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reads_back_and_unknown_words_are_refused() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        assert!("Running".parse::<Status>().is_err());
        assert!("".parse::<Status>().is_err());
    }

    #[test]
    fn deleted_is_final_and_every_status_but_deleted_can_end_deleted() {
        assert!(Status::ALL.iter().all(|s| !Deleted.may_become(*s)));
        // Each status other than `deleted` reaches it: nothing is stuck for ever.
        for start in Status::ALL.into_iter().filter(|s| *s != Deleted) {
            let mut seen = vec![start];
            let mut i = 0;
            while i < seen.len() {
                let from = seen[i];
                for (_, to) in TRANSITIONS.iter().filter(|(f, _)| *f == from) {
                    if !seen.contains(to) {
                        seen.push(*to);
                    }
                }
                i += 1;
            }
            assert!(seen.contains(&Deleted), "{start} cannot reach deleted");
        }
    }

    #[test]
    fn the_moves_the_lifecycle_relies_on_are_allowed_and_others_are_not() {
        assert_eq!(Running.sources(), vec!["creating", "starting", "unreachable"]);
        assert_eq!(Stopped.sources(), vec!["stopping", "starting"]);
        assert_eq!(Deleted.sources(), vec!["creating", "deleting"]);
        assert!(!Stopped.may_become(Running), "a start goes through starting");
        assert!(!Deleting.may_become(Running));
        assert!(!Failed.may_become(Running), "a failed environment recovers through a start");
    }

    #[test]
    fn the_occupying_list_names_exactly_the_statuses_that_hold_a_container() {
        let occupying: Vec<&str> = Status::ALL
            .into_iter()
            .filter(|s| !matches!(s, Stopped | Failed | Deleted | Deleting))
            .map(Status::as_str)
            .collect();
        for s in Status::ALL {
            assert_eq!(OCCUPYING_SQL.contains(&format!("'{s}'")), occupying.contains(&s.as_str()), "{s}");
        }
    }
}
