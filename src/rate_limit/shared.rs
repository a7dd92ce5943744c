//! Limits counted in Redis, shared by every replica that uses the same server: the same
//! GCRA as [`super::local`] (a bucket of a minute's cells refilled evenly), its state one
//! "theoretical arrival time" per bucket, checked and updated for all of a request's limits
//! in one Lua script, so that concurrent requests on any replicas never both take the last
//! cell. Time is Redis's own clock: replicas' clocks need not agree.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::{ClientId, Refusal, Spec, Taken};

/// KEYS: one bucket per limit. ARGV[1]: `take` (one cell of each, all or none) or `drain`
/// (ARGV's cells of each, as many as there are); then per limit its cells per minute and
/// the cells asked. Answers `{0, remaining...}`, or `{refusing limit (1-based), wait in µs,
/// remaining in the limits before it...}`.
const GCRA: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local period = 60000000
local take = ARGV[1] == 'take'
local arrivals, remaining = {}, {}
for i, key in ipairs(KEYS) do
  local interval = period / tonumber(ARGV[2 * i])
  local n = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local next_tat = tat + n * interval
  if take then
    if next_tat - period > now then
      local refusal = {i, math.ceil(next_tat - period - now)}
      for j = 1, i - 1 do refusal[j + 2] = remaining[j] end
      return refusal
    end
  elseif next_tat > now + period then
    next_tat = now + period
  end
  arrivals[i] = next_tat
  remaining[i] = math.floor((now + period - next_tat) / interval + 1e-6)
end
for i, key in ipairs(KEYS) do
  local ttl_ms = math.ceil((arrivals[i] - now) / 1000) + 1
  redis.call('SET', key, string.format('%.0f', arrivals[i]), 'PX', ttl_ms)
end
table.insert(remaining, 1, 0)
return remaining
"#;

/// The limits' Redis and the script, cheap to clone.
///
/// Requests share one multiplexed connection (redis-rs's `ConnectionManager`): every
/// request's script goes out on it at once, pipelined, and it reconnects by itself after a
/// failure. A pool of connections (deadpool-redis) was measured first: it checks each
/// connection out with a PING round trip, which doubled the cost of a check.
#[derive(Clone)]
pub struct SharedLimits {
    client: redis::Client,
    connection: Arc<OnceCell<ConnectionManager>>,
    script: Arc<Script>,
    timeout: Duration,
}

impl SharedLimits {
    /// For the Redis at `url`; nothing connects until the first check.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("limits.redis_url: {e}"))?;
        Ok(Self {
            client,
            connection: Arc::new(OnceCell::new()),
            script: Arc::new(Script::new(GCRA)),
            timeout,
        })
    }

    /// The shared connection, made (without connecting yet) on first use.
    async fn connection(&self) -> Result<ConnectionManager, String> {
        self.connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    // Reconnecting happens in the background; a request never waits on retries.
                    .set_number_of_retries(0);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(|e| e.to_string())
    }

    /// Takes one cell of every limit in `specs` for `client`, all or none.
    pub async fn take(&self, specs: &[Spec], client: ClientId) -> Result<Taken, String> {
        let answer = self.run("take", specs, client, 1).await?;
        match answer.split_first() {
            Some((0, remaining)) if remaining.len() == specs.len() => {
                Ok(Ok(remaining.iter().map(|&r| cells(r)).collect()))
            }
            Some((&index, [wait_us, before @ ..]))
                if (1..=specs.len() as i64).contains(&index)
                    && before.len() == index as usize - 1 =>
            {
                Ok(Err(Refusal {
                    index: index as usize - 1,
                    wait: Duration::from_micros(u64::try_from(*wait_us).unwrap_or(0)),
                    before: before.iter().map(|&r| cells(r)).collect(),
                }))
            }
            _ => Err(format!(
                "unexpected answer from the limits script: {answer:?}"
            )),
        }
    }

    /// Takes up to `n` cells of each of `specs` for `client`, as many as there are.
    pub async fn drain(&self, specs: &[Spec], client: ClientId, n: u32) -> Result<(), String> {
        self.run("drain", specs, client, n).await.map(drop)
    }

    async fn run(
        &self,
        mode: &str,
        specs: &[Spec],
        client: ClientId,
        n: u32,
    ) -> Result<Vec<i64>, String> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(mode);
        for spec in specs {
            invocation
                .key(key(spec, client))
                .arg(spec.per_minute)
                .arg(n);
        }
        let call = async {
            let mut connection = self.connection().await?;
            invocation
                .invoke_async::<Vec<i64>>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
    }
}

/// A count of cells from the script.
fn cells(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// `duet:limits:<requests|tokens>:<client hash|all>`: no key names a client's API key.
fn key(spec: &Spec, client: ClientId) -> String {
    let kind = if spec.is_tokens() {
        "tokens"
    } else {
        "requests"
    };
    if spec.per_client {
        format!("duet:limits:{kind}:{:016x}", client.0)
    } else {
        format!("duet:limits:{kind}:all")
    }
}
