//! What a client sees when the engine fails while generating (a panic in model code, forced
//! here through the engine's test hook): the stream in flight ends with an SSE error event
//! and `[DONE]`, `/health` says `failed` with the reason, and the next request loads the
//! model again and is answered. Real SmolLM2 model.

mod common;

use common::{SMOLLM2, config_for, health, model_id, post, spawn_with};
use futures::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn a_panic_in_the_engine_ends_the_stream_with_an_error_and_the_next_request_reloads() {
    let (base, engine) = spawn_with(config_for(SMOLLM2), None);
    let engine = engine.expect("duet runs its own engine");
    let body = json!({
        "model": model_id(SMOLLM2), "stream": true, "temperature": 0, "max_tokens": 200,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    });
    let resp = post(&base, &body).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    engine.inject_panic();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("a data event"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("internal error"), "{error}");
    assert!(
        !message.contains("injected"),
        "the panic's own words stay in the log: {error}"
    );

    let student = health(&base).await["student"].clone();
    assert_eq!(student["state"], "failed", "{student}");
    assert!(
        student["reason"]
            .as_str()
            .unwrap()
            .contains("internal error"),
        "{student}"
    );

    let again = json!({
        "model": model_id(SMOLLM2), "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    let resp = post(&base, &again).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    let student = health(&base).await["student"].clone();
    assert_eq!(student["state"], "ready", "{student}");
    assert_eq!(student["loads"], 2, "{student}");
}
