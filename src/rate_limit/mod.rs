//! Rate limits: requests and generated tokens per minute, per client (its API key when it
//! sends one, else its address) and for the whole server, counted in this process
//! ([`local`]) or in Redis for every replica ([`shared`], `limits.backend = "redis"`). Every
//! answer carries OpenAI's `x-ratelimit-*` headers; a request over a limit gets 429 with
//! `Retry-After`. While Redis cannot be reached, `limits.redis_failure` picks between
//! counting locally meanwhile and refusing with 503: never a hang, never a 500.

pub mod local;
pub mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::{LimitsBackend, LimitsConfig, RedisFailure};
use crate::error::DuetError;
use local::LocalLimits;
use shared::SharedLimits;

/// After Redis fails, checks skip it for this long: a dead Redis costs a request nothing.
const REDIS_RETRY: Duration = Duration::from_secs(1);

/// Who a request comes from, as a hash (a client's API key is never kept). The hash is
/// SHA-256's, the same in every replica and every build, so shared limits agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId(u64);

impl ClientId {
    /// From the bearer token when there is one, else from the client's address.
    pub fn of(bearer: Option<&str>, address: Option<std::net::IpAddr>) -> Self {
        let mut hasher = Sha256::new();
        match (bearer, address) {
            (Some(token), _) => {
                hasher.update("key:");
                hasher.update(token);
            }
            (None, Some(address)) => {
                hasher.update("addr:");
                hasher.update(address.to_string());
            }
            (None, None) => hasher.update("unknown"),
        }
        let digest = hasher.finalize();
        Self(u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")))
    }
}

/// One configured limit.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// `"requests"` or `"tokens"`.
    kind: &'static str,
    per_minute: u32,
    /// One bucket per client, or one for everyone.
    per_client: bool,
}

impl Spec {
    fn is_tokens(&self) -> bool {
        self.kind == "tokens"
    }
}

/// A check's outcome: every limit's cells left, or the limit that had none.
pub type Taken = Result<Vec<u32>, Refusal>;

/// The limit (index into the specs) that refused, when it would have had the cells, and the
/// cells left in the limits before it.
#[derive(Debug)]
pub struct Refusal {
    index: usize,
    wait: Duration,
    before: Vec<u32>,
}

/// All configured limits, and where they are counted.
pub struct RateLimits {
    /// Per-client before server-wide, requests before tokens: the order headers report.
    specs: Vec<Spec>,
    local: Arc<LocalLimits>,
    shared: Option<SharedLimits>,
    on_redis_failure: RedisFailure,
    /// Until when checks skip Redis after it failed (since `started`).
    skip_redis_until_ms: AtomicU64,
    started: Instant,
    redis_down: AtomicBool,
    redis_failures: AtomicU64,
}

/// The `x-ratelimit-*` headers for an answer.
pub type RateHeaders = Vec<(&'static str, String)>;

impl RateLimits {
    pub fn new(c: &LimitsConfig) -> Result<Self, String> {
        let specs: Vec<Spec> = [
            ("requests", c.requests_per_minute, true),
            ("requests", c.global_requests_per_minute, false),
            ("tokens", c.tokens_per_minute, true),
            ("tokens", c.global_tokens_per_minute, false),
        ]
        .into_iter()
        .filter(|&(_, per_minute, _)| per_minute > 0)
        .map(|(kind, per_minute, per_client)| Spec {
            kind,
            per_minute,
            per_client,
        })
        .collect();
        let shared = match c.backend {
            LimitsBackend::Local => None,
            LimitsBackend::Redis => Some(SharedLimits::new(
                c.redis_url.expose(),
                Duration::from_millis(c.redis_timeout_ms),
            )?),
        };
        Ok(Self {
            local: Arc::new(LocalLimits::new(&specs)),
            specs,
            shared,
            on_redis_failure: c.redis_failure,
            skip_redis_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            redis_down: AtomicBool::new(false),
            redis_failures: AtomicU64::new(0),
        })
    }

    /// Checks Redis could not answer (they were counted locally or refused instead).
    pub fn redis_failures(&self) -> u64 {
        self.redis_failures.load(Ordering::Relaxed)
    }

    /// Admits one request from `client` (and its first token), or says when to retry.
    pub async fn check(&self, client: ClientId) -> Result<RateHeaders, DuetError> {
        if self.specs.is_empty() {
            return Ok(RateHeaders::new());
        }
        let taken = match self.shared_answer(client).await {
            Some(taken) => taken,
            // Redis is configured but did not answer (with the local backend, nothing to refuse).
            None if self.shared.is_some() && self.on_redis_failure == RedisFailure::Refuse => {
                return Err(DuetError::LimitsUnavailable);
            }
            None => self.local.take(client),
        };
        self.headers_for(taken)
    }

    /// Redis's answer, or `None` when it cannot give one now.
    async fn shared_answer(&self, client: ClientId) -> Option<Taken> {
        let shared = self.shared.as_ref()?;
        if self.elapsed_ms() < self.skip_redis_until_ms.load(Ordering::Relaxed) {
            self.redis_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match shared.take(&self.specs, client).await {
            Ok(taken) => {
                if self.redis_down.swap(false, Ordering::Relaxed) {
                    tracing::warn!("Redis answers again: rate limits are shared across replicas");
                }
                Some(taken)
            }
            Err(e) => {
                self.redis_failed(&e);
                None
            }
        }
    }

    fn redis_failed(&self, error: &str) {
        self.redis_failures.fetch_add(1, Ordering::Relaxed);
        self.skip_redis_until_ms.store(
            self.elapsed_ms() + REDIS_RETRY.as_millis() as u64,
            Ordering::Relaxed,
        );
        if !self.redis_down.swap(true, Ordering::Relaxed) {
            let meanwhile = match self.on_redis_failure {
                RedisFailure::Local => "each replica counts its own until it is back",
                RedisFailure::Refuse => "limited requests get 503 until it is back",
            };
            tracing::warn!(%error, "the rate limits' Redis cannot be reached; {meanwhile}");
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The headers of an admitted request, or the 429 of a refused one: for each kind, the
    /// first limit (per client before server-wide), as OpenAI reports one per kind.
    fn headers_for(&self, taken: Taken) -> Result<RateHeaders, DuetError> {
        let reported = |specs: &[Spec], remaining: &[u32]| {
            let mut headers = RateHeaders::new();
            for kind in ["requests", "tokens"] {
                if let Some((spec, left)) =
                    specs.iter().zip(remaining).find(|(s, _)| s.kind == kind)
                {
                    headers.extend(describe(kind, spec.per_minute, *left));
                }
            }
            headers
        };
        match taken {
            Ok(remaining) => Ok(reported(&self.specs, &remaining)),
            Err(Refusal {
                index,
                wait,
                before,
            }) => {
                let spec = self.specs[index];
                // The other kind as it stood (when it came first), the refusing one empty.
                let mut headers: RateHeaders = self.specs[..index]
                    .iter()
                    .zip(&before)
                    .filter(|(s, _)| s.kind != spec.kind)
                    .take(1)
                    .flat_map(|(s, left)| describe(s.kind, s.per_minute, *left))
                    .collect();
                headers.extend(describe(spec.kind, spec.per_minute, 0));
                let scope = if spec.per_client {
                    "per client"
                } else {
                    "for this server"
                };
                let retry_after_secs = wait.as_secs() + 1;
                Err(DuetError::RateLimited {
                    message: format!(
                        "rate limit reached: {} {} per minute {scope}; retry in {retry_after_secs}s",
                        spec.per_minute, spec.kind
                    ),
                    retry_after_secs,
                    headers,
                })
            }
        }
    }

    /// Charges tokens generated for `client` beyond the first (which `check` took). Shared
    /// limits are charged in the background: the answer is already on its way.
    pub fn charge_tokens(&self, client: ClientId, generated: u32) {
        let n = generated.saturating_sub(1);
        let tokens: Vec<Spec> = self
            .specs
            .iter()
            .filter(|s| s.is_tokens())
            .copied()
            .collect();
        if n == 0 || tokens.is_empty() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        match (&self.shared, runtime) {
            (Some(shared), Ok(runtime)) => {
                let (shared, local) = (shared.clone(), self.local.clone());
                runtime.spawn(async move {
                    if shared.drain(&tokens, client, n).await.is_err() {
                        local.drain_tokens(client, n);
                    }
                });
            }
            _ => self.local.drain_tokens(client, n),
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
        .unwrap()
    }

    #[tokio::test]
    async fn requests_are_counted_per_client() {
        let l = limits(3, 0);
        let (a, b) = (
            ClientId::of(Some("key-a"), None),
            ClientId::of(Some("key-b"), None),
        );
        for expected_remaining in ["2", "1", "0"] {
            let h = l.check(a).await.unwrap();
            assert!(
                h.contains(&("x-ratelimit-remaining-requests", expected_remaining.into())),
                "{h:?}"
            );
        }
        match l.check(a).await {
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
        assert!(
            l.check(b).await.is_ok(),
            "another client has its own bucket"
        );
    }

    #[test]
    fn generated_tokens_spend_the_token_budget() {
        let l = limits(0, 100);
        let c = ClientId::of(None, Some([127, 0, 0, 1].into()));
        let check = |l: &RateLimits| futures::executor::block_on(l.check(c));
        check(&l).unwrap();
        l.charge_tokens(c, 500); // more than the bucket holds: it is emptied
        assert!(matches!(check(&l), Err(DuetError::RateLimited { .. })));
    }

    #[test]
    fn refusing_on_redis_failure_means_nothing_without_redis() {
        let l = RateLimits::new(&LimitsConfig {
            requests_per_minute: 2,
            redis_failure: RedisFailure::Refuse,
            ..Default::default()
        })
        .unwrap();
        let c = ClientId::of(Some("k"), None);
        assert!(futures::executor::block_on(l.check(c)).is_ok());
    }

    #[test]
    fn a_client_hashes_the_same_in_every_process() {
        // Shared limits key buckets by this hash: replicas must agree on it.
        assert_eq!(
            ClientId::of(Some("sk-a"), None),
            ClientId::of(Some("sk-a"), Some([10, 0, 0, 1].into()))
        );
        assert_eq!(
            format!("{:016x}", ClientId::of(None, Some([10, 0, 0, 1].into())).0),
            "150f48cb0891a404"
        );
    }
}
