//! Limits counted in this process with governor (GCRA): one table of buckets per limit,
//! one bucket per client (or one for everyone), refilled evenly over a minute.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::{ClientId, Refusal, Spec, Taken};

type Limiter =
    RateLimiter<u64, DefaultKeyedStateStore<u64>, DefaultClock, StateInformationMiddleware>;

/// The key of the one bucket a server-wide limiter has.
const EVERYONE: u64 = 0;

/// Every configured limit's buckets, in the order of its [`Spec`]s.
pub struct LocalLimits {
    limits: Vec<(Spec, Limiter)>,
    checks: AtomicU64,
}

impl LocalLimits {
    pub fn new(specs: &[Spec]) -> Self {
        let limits = specs
            .iter()
            .map(|spec| {
                let n = NonZeroU32::new(spec.per_minute).expect("specs are of limits that are on");
                let limiter = RateLimiter::keyed(Quota::per_minute(n))
                    .with_middleware::<StateInformationMiddleware>();
                (*spec, limiter)
            })
            .collect();
        Self {
            limits,
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one cell of every limit for `client`, in order, up to the first that has none.
    pub fn take(&self, client: ClientId) -> Taken {
        // Forget idle clients now and then so the per-client tables stay small.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            for (_, limiter) in &self.limits {
                limiter.retain_recent();
            }
        }
        let mut remaining = Vec::with_capacity(self.limits.len());
        for (index, (spec, limiter)) in self.limits.iter().enumerate() {
            match take_n(limiter, key(spec, client), 1) {
                Ok(left) => remaining.push(left),
                Err(wait) => {
                    return Err(Refusal {
                        index,
                        wait,
                        before: remaining,
                    });
                }
            }
        }
        Ok(remaining)
    }

    /// Takes up to `n` cells of every token limit, as many as there are (generated tokens
    /// are charged after the fact and cannot be refused any more).
    pub fn drain_tokens(&self, client: ClientId, n: u32) {
        for (spec, limiter) in self.limits.iter().filter(|(s, _)| s.is_tokens()) {
            let key = key(spec, client);
            let (mut left, mut chunk) = (n, n.min(spec.per_minute));
            while left > 0 && chunk > 0 {
                match take_n(limiter, key, chunk.min(left)) {
                    Ok(_) => left -= chunk.min(left),
                    Err(_) => chunk /= 2,
                }
            }
        }
    }
}

fn key(spec: &Spec, client: ClientId) -> u64 {
    if spec.per_client {
        client.0.max(1) // 0 is the everyone bucket
    } else {
        EVERYONE
    }
}

/// Takes `n` cells; on refusal, how long until they would be there.
fn take_n(limiter: &Limiter, key: u64, n: u32) -> Result<u32, Duration> {
    let n = NonZeroU32::new(n.max(1)).expect("at least one");
    match limiter.check_key_n(&key, n) {
        Ok(Ok(snapshot)) => Ok(snapshot.remaining_burst_capacity()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
        Err(_) => Err(Duration::from_secs(60)), // more than a minute's worth
    }
}
