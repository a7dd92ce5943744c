//! Black-box tests of what continuous batching and the prompt cache promise a user, with the
//! real SmolLM2 model: concurrent requests get exactly the answers they get alone, and a
//! conversation's next turn reuses the key/value cache of the turn before it (reported as
//! OpenAI does, in `usage.prompt_tokens_details.cached_tokens`).

mod common;

use common::{SMOLLM2, config_for, health, metric, model_id, post, spawn};
use serde_json::{Value, json};

async fn chat(base: &str, messages: Value, max_tokens: u32) -> Value {
    let body = json!({
        "model": model_id(SMOLLM2), "temperature": 0, "max_tokens": max_tokens,
        "messages": messages,
    });
    let resp = post(base, &body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn content(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn concurrent_requests_get_the_answers_they_get_alone() {
    let base = spawn(config_for(SMOLLM2));
    let prompts = [
        "Name three colors.",
        "Write a short poem about the sea.",
        "What is two plus two?",
        "List four fruits and say which is sweetest.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(content(
            &chat(&base, json!([{"role": "user", "content": p}]), 24).await,
        ));
    }
    let before = health(&base).await["student"].clone();
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|p| chat(&base, json!([{"role": "user", "content": p}]), 24)),
    )
    .await;
    let together: Vec<String> = together.iter().map(content).collect();
    assert_eq!(together, alone);
    let after = health(&base).await["student"].clone();
    assert_eq!(after["completed"], 8);
    // Run together, the four shared their forward passes: an engine that ran them one at a
    // time would carry one sequence per pass.
    let delta = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    let mean_batch = delta("batched_sequences") as f64 / delta("forward_passes") as f64;
    assert!(
        mean_batch >= 2.0,
        "{} sequences over {} passes",
        delta("batched_sequences"),
        delta("forward_passes")
    );
}

#[tokio::test]
async fn a_conversations_next_turn_reuses_the_cached_prefix() {
    let base = spawn(config_for(SMOLLM2));
    let story =
        "The keeper of the lighthouse counted ships each night and wrote their names down. "
            .repeat(20);
    let mut messages = vec![json!({"role": "user", "content": story})];
    let first = chat(&base, json!(messages), 16).await;
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // The engine keeps the cache right after the answer's last event: give it a moment.
    let mut held = 0;
    for _ in 0..50 {
        held = metric(&base, "duet_prompt_cache_bytes").await;
        if held > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(held > 0, "the finished sequence's cache is kept");

    messages.push(json!({"role": "assistant", "content": content(&first)}));
    messages.push(json!({"role": "user", "content": "Which ships did the keeper count?"}));
    let second = chat(&base, json!(messages), 16).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let second_prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= first_prompt && cached < second_prompt,
        "turn two reuses turn one's {first_prompt} prompt tokens: {cached} of {second_prompt}"
    );
}
