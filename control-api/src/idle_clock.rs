//! When a running workspace's idle stop comes, and why not yet: the pure rule over what keeps
//! it awake (sessions through the gateways, busy GPUs, its owner's hold), the warning that
//! precedes the stop, and how the API shows it. The idle task ([`crate::idle`]) and the
//! environment view both read it, so what the API promises is what the task does.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why a workspace is not idle now (the first that applies, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitingBecause {
    /// A session is open through a gateway (policy `no_connections`).
    SessionOpen,
    /// One of its GPUs is busy: its last sample, fresh, is at or above `idle.gpu_busy_percent`.
    GpuBusy,
    /// Its owner holds it awake until `held_until`.
    Held,
    /// Some gateway's activity is unknown (stale or none registered): nothing is stopped
    /// until every gateway reports again.
    GatewayStale,
}

/// What the rule needs to know about one running workspace with an idle limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// Its idle limit, seconds (above 0).
    pub limit_s: u64,
    /// `idle.warning_before_s`.
    pub warning_before_s: u64,
    /// A session is open and the policy counts open sessions.
    pub session_open: bool,
    /// A GPU it holds is busy now (a fresh sample at or above the threshold).
    pub gpu_busy: bool,
    /// Some gateway's activity is unknown.
    pub activity_unknown: bool,
    /// Unix ms of its last activity: the latest of its last byte or session through any
    /// gateway, its last busy GPU sample and when it last started.
    pub last_activity_ms: u64,
    /// Unix ms its owner's hold ends (0: none).
    pub held_until_ms: u64,
    /// Unix ms of its last `idle_warning` (0: never).
    pub warned_ms: u64,
    /// Now, unix ms.
    pub now_ms: u64,
}

/// The rule's answer for one workspace now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// How long it has been idle, ms (0 while something keeps it awake).
    pub idle_ms: u64,
    /// When this idle period began (unix ms): its last activity or its hold's end.
    pub period_start_ms: u64,
    /// Why it is not idle now.
    pub waiting: Option<WaitingBecause>,
    /// When it stops if nothing happens meanwhile (unix ms); `None` while what keeps it
    /// awake has no known end (an open session, a busy GPU, unknown activity).
    pub stop_at_ms: Option<u64>,
    /// When this idle period's warning went out (unix ms), if it did.
    pub warned_ms: Option<u64>,
    /// The warning is due now (and was not sent in this idle period).
    pub warn_now: bool,
    /// The stop is due now (the warning went out at least its lead before).
    pub stop_now: bool,
}

/// The idle rule. An idle period starts at the later of the last activity and the hold's end;
/// the stop is due `limit` after that start. The warning comes `lead` before the stop, where
/// `lead` is `warning_before_s` or the limit, if shorter, and once per idle period (a warning
/// from before the period's start belongs to an earlier one). The stop never comes sooner
/// than `lead` after the warning, so a workspace is never stopped unwarned, even when a check
/// comes late.
pub fn clock(i: Inputs) -> Clock {
    let limit_ms = i.limit_s.saturating_mul(1000);
    let lead_ms = i.warning_before_s.min(i.limit_s).saturating_mul(1000);
    let held = i.held_until_ms > i.now_ms;
    let waiting = if i.session_open {
        Some(WaitingBecause::SessionOpen)
    } else if i.gpu_busy {
        Some(WaitingBecause::GpuBusy)
    } else if held {
        Some(WaitingBecause::Held)
    } else if i.activity_unknown {
        Some(WaitingBecause::GatewayStale)
    } else {
        None
    };
    let awake = i.session_open || i.gpu_busy;
    let start_ms = if awake { i.now_ms } else { i.last_activity_ms.max(i.held_until_ms) };
    let idle_ms = i.now_ms.saturating_sub(start_ms);
    let warned_ms = (i.warned_ms > 0 && i.warned_ms >= start_ms).then_some(i.warned_ms);
    let due_ms = start_ms.saturating_add(limit_ms);
    // The warning goes out when due (or now, if that passed unwarned); the stop follows.
    let warn_at_ms = warned_ms.unwrap_or_else(|| i.now_ms.max(due_ms.saturating_sub(lead_ms)));
    let stop_at_ms = due_ms.max(warn_at_ms.saturating_add(lead_ms));
    let predictable = matches!(waiting, None | Some(WaitingBecause::Held));
    let decides = waiting.is_none();
    Clock {
        idle_ms,
        period_start_ms: start_ms,
        waiting,
        stop_at_ms: predictable.then_some(stop_at_ms),
        warned_ms,
        warn_now: decides && warned_ms.is_none() && i.now_ms >= due_ms.saturating_sub(lead_ms),
        stop_now: decides && warned_ms.is_some() && i.now_ms >= stop_at_ms,
    }
}

/// One GPU's last utilisation sample, as the environment view shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GpuUtilization {
    /// The GPU's inventory key (its UUID).
    pub gpu: String,
    /// Its utilisation at the last sample, percent (null: the host reported none).
    pub percent: Option<u8>,
    /// When the last sample was taken (null: never sampled; GPUs listed by index in
    /// configuration, or a host whose API process has no `nvidia-smi`).
    pub sampled_at: Option<DateTime<Utc>>,
    /// Whether the sample is recent enough to count (within three idle check intervals); a
    /// stale sample is unknown, never busy.
    pub fresh: bool,
    /// Fresh and at or above `idle.gpu_busy_percent`: the workspace is not idle.
    pub busy: bool,
}

/// `idle` of a running environment: when the idle stop comes and why not yet.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IdleView {
    /// When it is stopped if nothing happens meanwhile (null: no idle limit, or what keeps it
    /// awake has no known end: `session_open`, `gpu_busy`, `gateway_stale`).
    pub stop_at: Option<DateTime<Utc>>,
    /// Why it is not idle now (null: it is idle, and `idle_seconds` counts; or no limit).
    #[schema(value_type = Option<WaitingBecause>)]
    pub waiting_because: Option<WaitingBecause>,
    /// Until when its owner holds it awake (`POST .../hold`); null: no hold now.
    pub held_until: Option<DateTime<Utc>>,
    /// When the `idle_warning` of this idle period went out (null: not yet).
    pub warned_at: Option<DateTime<Utc>>,
    /// The last utilisation sample of each GPU it holds.
    pub gpu_utilization: Vec<GpuUtilization>,
}

/// Unix ms of a timestamp (0 for none or before 1970).
pub fn ms(t: Option<DateTime<Utc>>) -> u64 {
    t.and_then(|t| u64::try_from(t.timestamp_millis()).ok()).unwrap_or(0)
}

/// The timestamp of unix ms.
pub fn at(ms: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn idle(limit_s: u64, warning_before_s: u64, last_activity_ms: u64, now_ms: u64) -> Inputs {
        Inputs {
            limit_s,
            warning_before_s,
            session_open: false,
            gpu_busy: false,
            activity_unknown: false,
            last_activity_ms,
            held_until_ms: 0,
            warned_ms: 0,
            now_ms,
        }
    }

    #[test]
    fn the_warning_comes_its_lead_before_the_stop_and_once_per_period() {
        // Limit 600 s, warning 300 s before: quiet since t=0.
        let c = clock(idle(600, 300, 0, 100 * S));
        assert_eq!((c.idle_ms, c.waiting, c.stop_at_ms), (100 * S, None, Some(600 * S)));
        assert!(!c.warn_now && !c.stop_now);
        let c = clock(idle(600, 300, 0, 300 * S));
        assert!(c.warn_now && !c.stop_now, "{c:?}");
        // Warned at 300 s: no second warning, the stop at 600 s.
        let warned = Inputs { warned_ms: 300 * S, ..idle(600, 300, 0, 450 * S) };
        let c = clock(warned);
        assert_eq!((c.warn_now, c.stop_now, c.warned_ms), (false, false, Some(300 * S)));
        assert!(clock(Inputs { now_ms: 600 * S, ..warned }).stop_now);
        // Activity after the warning starts a new period: that warning no longer counts.
        let c = clock(Inputs { last_activity_ms: 500 * S, ..Inputs { now_ms: 700 * S, ..warned } });
        assert_eq!((c.warned_ms, c.stop_at_ms, c.warn_now), (None, Some(1100 * S), false));
    }

    #[test]
    fn a_late_check_warns_first_and_stops_a_lead_later() {
        // The check comes long after the stop was due, unwarned: warn now, stop 300 s later.
        let c = clock(idle(600, 300, 0, 2000 * S));
        assert!(c.warn_now && !c.stop_now, "{c:?}");
        assert_eq!(c.stop_at_ms, Some(2300 * S));
        // A limit shorter than the lead: warned as soon as idle, stopped a limit later.
        let c = clock(idle(2, 300, 10 * S, 10 * S));
        assert!(c.warn_now && !c.stop_now);
        assert_eq!(c.stop_at_ms, Some(12 * S));
        assert!(clock(Inputs { warned_ms: 10 * S, ..idle(2, 300, 10 * S, 12 * S) }).stop_now);
        // No lead (warning_before_s = 0): the warning and the stop in the same check.
        let c = clock(idle(60, 0, 0, 60 * S));
        assert!(c.warn_now && !c.stop_now);
        assert!(clock(Inputs { warned_ms: 60 * S, ..idle(60, 0, 0, 60 * S) }).stop_now);
        // Never a stop without a warning of this period.
        assert!(!clock(idle(1, 0, 0, 1_000_000 * S)).stop_now);
    }

    #[test]
    fn sessions_busy_gpus_holds_and_unknown_activity_keep_it_awake() {
        let quiet = idle(60, 30, 0, 1000 * S);
        let open = clock(Inputs { session_open: true, gpu_busy: true, ..quiet });
        assert_eq!((open.waiting, open.idle_ms, open.stop_at_ms), (Some(WaitingBecause::SessionOpen), 0, None));
        assert!(!open.warn_now && !open.stop_now);
        let busy = clock(Inputs { gpu_busy: true, held_until_ms: 2000 * S, ..quiet });
        assert_eq!((busy.waiting, busy.idle_ms, busy.stop_at_ms), (Some(WaitingBecause::GpuBusy), 0, None));
        assert!(!busy.warn_now && !busy.stop_now);
        // A hold: stop at its end plus the limit; no warning before the idle period starts.
        let held = clock(Inputs { held_until_ms: 2000 * S, ..quiet });
        assert_eq!((held.waiting, held.idle_ms, held.stop_at_ms), (Some(WaitingBecause::Held), 0, Some(2060 * S)));
        assert!(!held.warn_now && !held.stop_now);
        // Its end: the idle clock counts from there.
        let after = clock(Inputs { held_until_ms: 2000 * S, now_ms: 2040 * S, ..quiet });
        assert_eq!((after.waiting, after.idle_ms), (None, 40 * S));
        assert!(after.warn_now, "30 s before a stop at 2060 s");
        // A warning before the hold belongs to an earlier period.
        let c = clock(Inputs { held_until_ms: 2000 * S, warned_ms: 1500 * S, now_ms: 2070 * S, ..quiet });
        assert_eq!(c.warned_ms, None);
        assert!(c.warn_now && !c.stop_now);
        // Unknown activity: nothing is decided, nothing promised.
        let stale = clock(Inputs { activity_unknown: true, warned_ms: 900 * S, ..quiet });
        assert_eq!((stale.waiting, stale.stop_at_ms), (Some(WaitingBecause::GatewayStale), None));
        assert!(!stale.warn_now && !stale.stop_now);
    }

    #[test]
    fn clocks_never_overflow_or_underflow() {
        let c = clock(Inputs { limit_s: u64::MAX, warning_before_s: u64::MAX, ..idle(1, 1, u64::MAX, 0) });
        assert_eq!(c.idle_ms, 0);
        assert!(!c.stop_now);
        assert_eq!(ms(None), 0);
        assert_eq!(ms(at(1234)), 1234);
        assert_eq!(at(u64::MAX), None);
    }
}
