//! Token-bucket rate limits (GCRA, via `governor`), keyed by identity and by
//! remote IP address.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use quicnprotochat_core::IdentityKey;
use quicnprotochat_core::clock::SharedClock;

use crate::config::{Rate, RateLimits};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// The server's clock as governor's: monotonic time since the clock began.
#[derive(Debug, Clone)]
struct Elapsed(SharedClock);

impl governor::clock::Clock for Elapsed {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// One keyed limiter.
pub(crate) struct Limiter<K: Hash + Eq + Clone> {
    inner: RateLimiter<K, DefaultKeyedStateStore<K>, Elapsed, NoOpMiddleware<Duration>>,
    clock: Elapsed,
    /// the bucket's name in the metrics (its setting's name)
    bucket: &'static str,
    metrics: Arc<Metrics>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(rate: Rate, clock: &SharedClock, bucket: &'static str, metrics: &Arc<Metrics>) -> Self {
        let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let clock = Elapsed(clock.clone());
        Self {
            inner: RateLimiter::new(
                Quota::per_second(per_second).allow_burst(burst),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
            clock,
            bucket,
            metrics: metrics.clone(),
        }
    }

    /// Takes one token for `key`, or says when to retry.
    pub(crate) fn check(&self, key: &K) -> Result<(), ApiError> {
        self.inner.check_key(key).map_err(|not_until| {
            self.metrics.rate_limited(self.bucket);
            ApiError::RateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }
        })
    }

    /// Forgets keys whose buckets are full again (bounds memory).
    fn retain_recent(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// Every limiter of the server.
pub(crate) struct Limiters {
    pub(crate) auth_per_ip: Limiter<IpAddr>,
    pub(crate) auth_per_identity: Limiter<IdentityKey>,
    pub(crate) enqueue_per_identity: Limiter<IdentityKey>,
    pub(crate) enqueue_per_ip: Limiter<IpAddr>,
    pub(crate) kp_fetch_per_identity: Limiter<IdentityKey>,
    pub(crate) kp_fetch_per_ip: Limiter<IpAddr>,
}

impl Limiters {
    pub(crate) fn new(r: &RateLimits, clock: &SharedClock, metrics: &Arc<Metrics>) -> Self {
        Self {
            auth_per_ip: Limiter::new(r.auth_per_ip, clock, "auth_per_ip", metrics),
            auth_per_identity: Limiter::new(
                r.auth_per_identity,
                clock,
                "auth_per_identity",
                metrics,
            ),
            enqueue_per_identity: Limiter::new(
                r.enqueue_per_identity,
                clock,
                "enqueue_per_identity",
                metrics,
            ),
            enqueue_per_ip: Limiter::new(r.enqueue_per_ip, clock, "enqueue_per_ip", metrics),
            kp_fetch_per_identity: Limiter::new(
                r.key_package_fetch_per_identity,
                clock,
                "key_package_fetch_per_identity",
                metrics,
            ),
            kp_fetch_per_ip: Limiter::new(
                r.key_package_fetch_per_ip,
                clock,
                "key_package_fetch_per_ip",
                metrics,
            ),
        }
    }

    /// Periodic housekeeping.
    pub(crate) fn retain_recent(&self) {
        self.auth_per_ip.retain_recent();
        self.auth_per_identity.retain_recent();
        self.enqueue_per_identity.retain_recent();
        self.enqueue_per_ip.retain_recent();
        self.kp_fetch_per_identity.retain_recent();
        self.kp_fetch_per_ip.retain_recent();
    }
}
