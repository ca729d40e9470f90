//! Request limits on `/api/v1/*`, applied after authentication: a token bucket per
//! authenticated user (a valid token is never limited by anyone else's traffic), and one per
//! client address for failed authentications (a flood of made-up tokens is answered 429 once
//! its address has used its allowance; a valid token from the same address still passes).
//! Both answer 429 in the envelope with `Retry-After`.
//!
//! The user resolved here rides on the request, so the handler's `Caller` does not look the
//! token up a second time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::extract::{bearer, Authenticated};
use crate::config::RateLimitConfig;
use crate::db::users;
use crate::error::ApiError;
use crate::state::AppState;

/// Most keys a bucket map holds; past it, idle buckets are dropped, and if all are busy a new
/// key is refused (failed authentications only: users are few and bounded by the database).
const MAX_KEYS: usize = 65_536;

/// Token buckets by key: `rate` tokens per second up to `burst`.
struct Buckets<K> {
    rate: f64,
    burst: f64,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: f64, burst: u32) -> Self {
        Buckets { rate, burst: f64::from(burst.max(1)), map: Mutex::default() }
    }

    /// Takes one token of `key`'s bucket at `now`; `Err(seconds)` to wait when it is empty
    /// (or when the map is full of busy keys and `key` is new).
    fn take(&self, key: &K, now: Instant) -> Result<(), u64> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
            if map.len() >= MAX_KEYS {
                return Err(1);
            }
        }
        let (tokens, at) = map.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *tokens) / self.rate).ceil() as u64).max(1))
        }
    }
}

/// The address a failed authentication is charged to: the whole /64 for IPv6 (one host
/// holds that many addresses), the address for IPv4.
fn client_key(addr: Option<IpAddr>) -> u128 {
    match addr {
        Some(IpAddr::V4(a)) => u128::from(u32::from(a)),
        Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => u128::from(a) & !((1u128 << 64) - 1),
        },
        None => 0,
    }
}

struct Limiter {
    users: Option<Buckets<i64>>,
    failures: Option<Buckets<u128>>,
}

/// `router` behind the limits of `cfg` (authentication still happens when both are off: the
/// handlers' `Caller` then finds the user on the request).
pub fn apply(router: Router<AppState>, state: AppState, cfg: &RateLimitConfig) -> Router<AppState> {
    let limiter = Arc::new(Limiter {
        users: (cfg.per_second > 0.0).then(|| Buckets::new(cfg.per_second, cfg.burst)),
        failures: (cfg.failed_auth_per_minute > 0)
            .then(|| Buckets::new(f64::from(cfg.failed_auth_per_minute) / 60.0, cfg.failed_auth_burst)),
    });
    router.layer(middleware::from_fn_with_state((state, limiter), limit))
}

async fn limit(State((st, limiter)): State<(AppState, Arc<Limiter>)>, mut req: Request, next: Next) -> Response {
    let user = match bearer(req.headers()) {
        Some(token) => match users::user_for_token(&st.db, token).await {
            Ok(u) => u,
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let now = Instant::now();
    match user {
        Some(user) => {
            if let Some(b) = &limiter.users {
                if let Err(wait) = b.take(&user.id, now) {
                    return ApiError::RateLimited(wait).into_response();
                }
            }
            req.extensions_mut().insert(Authenticated(user));
        }
        None => {
            if let Some(b) = &limiter.failures {
                let addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
                if let Err(wait) = b.take(&client_key(addr), now) {
                    st.metrics.auth_failures_limited.inc();
                    return ApiError::RateLimited(wait).into_response();
                }
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let b = Buckets::new(2.0, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| b.take(&1, t).is_ok()));
        assert_eq!(b.take(&1, t), Err(1));
        // Another key has its own bucket.
        assert!(b.take(&2, t).is_ok());
        assert!(b.take(&1, t + Duration::from_millis(500)).is_ok());
        assert!(b.take(&1, t + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn failures_are_charged_per_ipv4_address_and_per_ipv6_64() {
        let a: IpAddr = "2001:db8::1".parse().expect("v6");
        let b: IpAddr = "2001:db8::ffff:2".parse().expect("v6");
        let c: IpAddr = "2001:db8:0:1::1".parse().expect("v6");
        assert_eq!(client_key(Some(a)), client_key(Some(b)));
        assert_ne!(client_key(Some(a)), client_key(Some(c)));
        let v4: IpAddr = "192.0.2.7".parse().expect("v4");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("mapped");
        assert_eq!(client_key(Some(v4)), client_key(Some(mapped)));
    }

    #[test]
    fn a_full_map_drops_idle_keys_before_refusing_new_ones() {
        let b = Buckets::new(1000.0, 1);
        let t = Instant::now();
        for k in 0..MAX_KEYS {
            b.take(&k, t).expect("room");
        }
        // All busy: a new key is refused rather than growing the map.
        assert!(b.take(&MAX_KEYS, t).is_err());
        // A moment later they have refilled (idle): dropped, and the new key gets a bucket.
        assert!(b.take(&MAX_KEYS, t + Duration::from_millis(5)).is_ok());
        assert!(b.map.lock().expect("lock").len() < MAX_KEYS);
    }
}
