//! Bounded memory under load, on real sockets with the real SmolLM2: a budget too small
//! for the model refuses it with both numbers; a spent budget, a full queue and a rate
//! limit each give 429 with Retry-After and an OpenAI body; keep_alive unloads; a client
//! that leaves gives its reservation back.

mod common;

use std::time::Duration;

use common::{SMOLLM2, config_for, health, model_id, post, spawn};
use duet::memory::KeepAlive;
use futures::StreamExt;
use serde_json::{Value, json};

fn ask(max_tokens: u32) -> Value {
    json!({"model": model_id(SMOLLM2), "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
           "max_tokens": max_tokens, "temperature": 1.0, "seed": 3})
}

/// Starts a long streamed generation and returns once its first bytes arrived.
async fn occupy(base: &str) -> impl futures::Stream<Item = reqwest::Result<actix_web::web::Bytes>> {
    let mut body = ask(3000);
    body["stream"] = json!(true);
    // Greedy, this prompt runs past 600 tokens (seconds of work) before it could stop.
    body["temperature"] = json!(0);
    body["messages"][0]["content"] = json!("Write a very long story about the sea.");
    let mut stream = post(base, &body).await.bytes_stream();
    stream.next().await.unwrap().unwrap();
    stream
}

async fn wait_for(base: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let h = health(base).await;
        if check(&h) {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} never happened: {}", health(base).await);
}

#[tokio::test]
async fn a_budget_too_small_refuses_the_model_with_both_numbers() {
    let mut config = config_for(SMOLLM2);
    config.memory.max_bytes = "50MB".parse().unwrap();
    let base = spawn(config);
    let resp = post(&base, &ask(4)).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs about") && message.contains("budget is 47.7 MiB"),
        "{message}"
    );
    let h = health(&base).await;
    assert_eq!(h["student"]["state"], "failed");
    assert!(h["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_spent_budget_is_a_429_and_the_leaver_gives_its_memory_back() {
    let mut config = config_for(SMOLLM2);
    // Room for the model (~120 MB estimated) and a 4,096-token context (~94 MB of f16
    // keys and values), and then for one 3,000-token request (~70 MB), not two.
    config.memory.max_bytes = "230MB".parse().unwrap();
    let base = spawn(config);
    let running = occupy(&base).await;
    let h = health(&base).await;
    assert!(
        h["memory"]["ledger"]["reserved_bytes"].as_u64().unwrap() > 60_000_000,
        "{h}"
    );
    let resp = post(&base, &ask(3000)).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory budget"),
        "{body}"
    );
    // A small request still fits beside the running one.
    let small = tokio::spawn({
        let base = base.clone();
        async move { post(&base, &ask(4)).await.status() }
    });
    drop(running); // the client leaves: its reservation must come back
    assert_eq!(small.await.unwrap(), 200);
    wait_for(&base, "reservations returned", |h| {
        h["memory"]["ledger"]["reserved_bytes"] == 0
    })
    .await;
    let mut again = ask(3000);
    again["stream"] = json!(true);
    let status = post(&base, &again).await.status();
    assert_eq!(status, 200, "the whole budget is free again");
}

#[tokio::test]
async fn a_full_queue_is_a_429_with_retry_after() {
    let mut config = config_for(SMOLLM2);
    config.student.queue_size = 1;
    config.student.parallel = 1;
    let base = spawn(config);
    let running = occupy(&base).await;
    let queued = tokio::spawn({
        let base = base.clone();
        async move { post(&base, &ask(2)).await.status() }
    });
    wait_for(&base, "the second request queued", |h| {
        h["memory"]["ledger"]["admitted"] == 2
    })
    .await;
    let resp = post(&base, &ask(2)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{body}"
    );
    drop(running);
    assert_eq!(
        queued.await.unwrap(),
        200,
        "the queued request is served once the slot frees"
    );
}

#[tokio::test]
async fn the_rate_limit_gives_429_after_its_count() {
    let mut config = config_for(SMOLLM2);
    config.limits.requests_per_minute = 2;
    let base = spawn(config);
    let keyed = |key: &str| {
        reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ask(1))
    };
    for remaining in ["1", "0"] {
        let resp = keyed("client-one").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], remaining);
    }
    let resp = keyed("client-one").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=31).contains(&retry), "{retry}");
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        keyed("client-two").send().await.unwrap().status(),
        200,
        "each key has its own count"
    );
}

#[tokio::test]
async fn keep_alive_zero_unloads_after_the_request() {
    let mut config = config_for(SMOLLM2);
    config.memory.keep_alive = KeepAlive::For(Duration::ZERO);
    let base = spawn(config);
    assert_eq!(post(&base, &ask(2)).await.status(), 200);
    let h = wait_for(&base, "unload", |h| h["student"]["state"] == "unloaded").await;
    assert_eq!(h["student"]["loads"], 1);
    assert_eq!(
        post(&base, &ask(2)).await.status(),
        200,
        "the next request loads it again"
    );
    wait_for(&base, "second unload", |h| {
        h["student"]["state"] == "unloaded" && h["student"]["loads"] == 2
    })
    .await;
}

#[tokio::test]
async fn a_request_can_set_its_own_keep_alive() {
    let base = spawn(config_for(SMOLLM2)); // default: five minutes
    let mut body = ask(2);
    body["keep_alive"] = json!(0);
    assert_eq!(post(&base, &body).await.status(), 200);
    wait_for(&base, "unload", |h| h["student"]["state"] == "unloaded").await;
    body["keep_alive"] = json!("soon");
    let resp = post(&base, &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "keep_alive");
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_gives_its_memory_back_at_once() {
    let mut config = config_for(SMOLLM2);
    config.student.parallel = 1;
    let base = spawn(config);
    let running = occupy(&base).await;
    let reserved = |h: &Value| h["memory"]["ledger"]["reserved_bytes"].as_u64().unwrap();
    let alone = reserved(&health(&base).await);
    let waiting = tokio::spawn({
        let base = base.clone();
        async move { post(&base, &ask(3000)).await.status() }
    });
    wait_for(&base, "the second request queued", |h| reserved(h) > alone).await;
    waiting.abort(); // the client leaves while its request waits behind the running one
    wait_for(&base, "its reservation returned", |h| reserved(h) == alone).await;
    let h = health(&base).await;
    assert_eq!(
        h["student"]["completed"], 0,
        "the running stream still runs: {h}"
    );
    drop(running);
}
