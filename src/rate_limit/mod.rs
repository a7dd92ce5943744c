//! Rate limits with governor: requests and generated tokens per minute, per client (its
//! API key when it sends one, else its address) and for the whole server. Every answer
//! carries OpenAI's `x-ratelimit-*` headers; a request over a limit gets 429 with
//! `Retry-After`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::LimitsConfig;
use crate::error::DuetError;

type Limiter =
    RateLimiter<u64, DefaultKeyedStateStore<u64>, DefaultClock, StateInformationMiddleware>;

/// The key of the one bucket a server-wide limiter has.
const EVERYONE: u64 = 0;

/// A limit of `per_minute` on some key.
struct Limit {
    per_minute: u32,
    limiter: Limiter,
    /// Whether it keeps one bucket per client or one for everyone.
    per_client: bool,
}

impl Limit {
    fn new(per_minute: u32, per_client: bool) -> Option<Self> {
        let n = NonZeroU32::new(per_minute)?;
        let limiter = RateLimiter::keyed(Quota::per_minute(n))
            .with_middleware::<StateInformationMiddleware>();
        Some(Self {
            per_minute,
            limiter,
            per_client,
        })
    }

    fn key(&self, client: ClientId) -> u64 {
        if self.per_client { client.0 } else { EVERYONE }
    }

    /// Takes `n` cells; on refusal, how long until they would be there.
    fn take(&self, client: ClientId, n: u32) -> Result<u32, std::time::Duration> {
        let n = NonZeroU32::new(n.max(1)).expect("at least one");
        match self.limiter.check_key_n(&self.key(client), n) {
            Ok(Ok(snapshot)) => Ok(snapshot.remaining_burst_capacity()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            Err(_) => Err(std::time::Duration::from_secs(60)), // more than a minute's worth
        }
    }

    /// Takes up to `n` cells, as many as there are (generated tokens are charged after
    /// the fact and cannot be refused any more).
    fn drain(&self, client: ClientId, mut n: u32) {
        let mut chunk = n.min(self.per_minute);
        while n > 0 && chunk > 0 {
            match self.take(client, chunk.min(n)) {
                Ok(_) => n -= chunk.min(n),
                Err(_) => chunk /= 2,
            }
        }
    }
}

/// Who a request comes from, as a hash (a client's API key is never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId(u64);

impl ClientId {
    /// From the bearer token when there is one, else from the peer address.
    pub fn of(bearer: Option<&str>, address: Option<std::net::IpAddr>) -> Self {
        let mut h = DefaultHasher::new();
        match bearer {
            Some(token) => ("key", token).hash(&mut h),
            None => ("addr", address).hash(&mut h),
        }
        Self(h.finish().max(1)) // 0 is the everyone bucket
    }
}

/// All configured limits.
pub struct RateLimits {
    requests: Vec<Limit>,
    tokens: Vec<Limit>,
    checks: AtomicU64,
}

/// The `x-ratelimit-*` headers for an answer.
pub type RateHeaders = Vec<(&'static str, String)>;

impl RateLimits {
    pub fn new(c: &LimitsConfig) -> Self {
        let requests = [
            Limit::new(c.requests_per_minute, true),
            Limit::new(c.global_requests_per_minute, false),
        ];
        let tokens = [
            Limit::new(c.tokens_per_minute, true),
            Limit::new(c.global_tokens_per_minute, false),
        ];
        Self {
            requests: requests.into_iter().flatten().collect(),
            tokens: tokens.into_iter().flatten().collect(),
            checks: AtomicU64::new(0),
        }
    }

    /// Admits one request from `client` (and its first token), or says when to retry.
    pub fn check(&self, client: ClientId) -> Result<RateHeaders, DuetError> {
        // Forget idle clients now and then so the per-client tables stay small.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            for limit in self.requests.iter().chain(&self.tokens) {
                limit.limiter.retain_recent();
            }
        }
        let mut headers = RateHeaders::new();
        for (kind, limits) in [("requests", &self.requests), ("tokens", &self.tokens)] {
            // Report the tightest limit of each kind, as OpenAI reports one per kind.
            let mut reported = false;
            for limit in limits.iter() {
                match limit.take(client, 1) {
                    Ok(remaining) if !reported => {
                        reported = true;
                        headers.extend(describe(kind, limit.per_minute, remaining));
                    }
                    Ok(_) => {}
                    Err(wait) => {
                        let mut headers = headers.clone();
                        headers.extend(describe(kind, limit.per_minute, 0));
                        let scope = if limit.per_client {
                            "per client"
                        } else {
                            "for this server"
                        };
                        return Err(DuetError::RateLimited {
                            message: format!(
                                "rate limit reached: {} {kind} per minute {scope}; retry in {}s",
                                limit.per_minute,
                                wait.as_secs() + 1
                            ),
                            retry_after_secs: wait.as_secs() + 1,
                            headers,
                        });
                    }
                }
            }
        }
        Ok(headers)
    }

    /// Charges tokens generated for `client` beyond the first (which `check` took).
    pub fn charge_tokens(&self, client: ClientId, generated: u32) {
        for limit in &self.tokens {
            limit.drain(client, generated.saturating_sub(1));
        }
    }
}

fn describe(kind: &'static str, limit: u32, remaining: u32) -> RateHeaders {
    let (limit_name, remaining_name, reset_name) = match kind {
        "requests" => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        _ => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    };
    // The bucket refills evenly over a minute; reset is when it is full again.
    let reset_ms = u64::from(limit.saturating_sub(remaining)) * 60_000 / u64::from(limit.max(1));
    vec![
        (limit_name, limit.to_string()),
        (remaining_name, remaining.to_string()),
        (reset_name, format!("{}ms", reset_ms)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: u32, tokens: u32) -> RateLimits {
        RateLimits::new(&LimitsConfig {
            requests_per_minute: requests,
            tokens_per_minute: tokens,
            ..Default::default()
        })
    }

    #[test]
    fn requests_are_counted_per_client() {
        let l = limits(3, 0);
        let (a, b) = (
            ClientId::of(Some("key-a"), None),
            ClientId::of(Some("key-b"), None),
        );
        for expected_remaining in ["2", "1", "0"] {
            let h = l.check(a).unwrap();
            assert!(
                h.contains(&("x-ratelimit-remaining-requests", expected_remaining.into())),
                "{h:?}"
            );
        }
        match l.check(a) {
            Err(DuetError::RateLimited {
                retry_after_secs,
                headers,
                ..
            }) => {
                assert!((1..=21).contains(&retry_after_secs));
                assert!(headers.contains(&("x-ratelimit-limit-requests", "3".into())));
            }
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(l.check(b).is_ok(), "another client has its own bucket");
    }

    #[test]
    fn generated_tokens_spend_the_token_budget() {
        let l = limits(0, 100);
        let c = ClientId::of(None, Some([127, 0, 0, 1].into()));
        l.check(c).unwrap();
        l.charge_tokens(c, 500); // more than the bucket holds: it is emptied
        assert!(matches!(l.check(c), Err(DuetError::RateLimited { .. })));
    }
}
