//! Black-box tests of the OpenAI API on a real socket, with the real SmolLM2 model, through
//! async-openai (the Rust counterpart of the official SDKs) and raw HTTP where the exact
//! bytes matter.

mod common;

use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    FinishReason, StopConfiguration,
};
use common::{SMOLLM2, client, config_for, health, model_id, post, smollm2, spawn};
use futures::StreamExt;
use serde_json::{Value, json};

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

fn request(text: &str, max_tokens: u32) -> CreateChatCompletionRequestArgs {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(model_id(SMOLLM2))
        .messages(vec![user(text)])
        .max_tokens(max_tokens)
        .temperature(0.0);
    args
}

async fn ask(req: CreateChatCompletionRequest) -> (String, Option<FinishReason>, u32) {
    let resp = client(smollm2())
        .chat()
        .create(req)
        .await
        .expect("a completion");
    let choice = &resp.choices[0];
    let usage = resp.usage.expect("usage");
    (
        choice.message.content.clone().unwrap_or_default(),
        choice.finish_reason,
        usage.completion_tokens,
    )
}

#[tokio::test]
async fn non_streamed_answer() {
    let resp = client(smollm2())
        .chat()
        .create(
            request("Write one sentence about the sea.", 24)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.object, "chat.completion");
    assert_eq!(resp.model, model_id(SMOLLM2));
    assert!(resp.id.starts_with("chatcmpl-"));
    let content = resp.choices[0].message.content.clone().unwrap();
    assert!(
        content.split_whitespace().count() >= 3,
        "a real answer: {content:?}"
    );
    let usage = resp.usage.unwrap();
    assert!(usage.prompt_tokens > 10);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
}

#[tokio::test]
async fn streamed_answer_through_the_sdk() {
    let mut req = request("Tell me a short story about a cat.", 20);
    req.stream_options(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = client(smollm2())
        .chat()
        .create_stream(req.build().unwrap())
        .await
        .unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.expect("a well-formed chunk"));
    }
    let first = &chunks[0];
    assert_eq!(
        first.choices[0].delta.role,
        Some(async_openai::types::chat::Role::Assistant)
    );
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.clone())
        .collect();
    assert!(!text.trim().is_empty());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish.choices[0].finish_reason, Some(FinishReason::Length));
    let usage_chunk = chunks.last().unwrap();
    assert!(usage_chunk.choices.is_empty());
    assert_eq!(usage_chunk.usage.as_ref().unwrap().completion_tokens, 20);
    assert!(
        chunks.iter().all(|c| c.id == first.id),
        "one id for the whole stream"
    );
}

/// The exact event sequence on the wire: role, deltas, finish, usage, [DONE].
#[tokio::test]
async fn stream_wire_format() {
    let body = json!({
        "model": model_id(SMOLLM2), "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8, "temperature": 0
    });
    let resp = post(smollm2(), &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["usage"].is_null(), "usage is null until the usage chunk");
    }
    let deltas = &chunks[1..chunks.len() - 2];
    assert!(!deltas.is_empty());
    for d in deltas {
        assert!(d["choices"][0]["delta"].get("role").is_none());
        assert!(d["choices"][0]["finish_reason"].is_null());
    }
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn temperature_zero_is_deterministic() {
    let a = ask(request("Name three colors.", 16).build().unwrap()).await;
    let b = ask(request("Name three colors.", 16).build().unwrap()).await;
    assert_eq!(a.0, b.0);
}

#[tokio::test]
async fn same_seed_same_text() {
    let sampled = |seed| {
        let mut r = request("Invent a name for a dog.", 16);
        r.temperature(1.0).seed(seed);
        r.build().unwrap()
    };
    let a = ask(sampled(1234)).await;
    let b = ask(sampled(1234)).await;
    assert_eq!(a.0, b.0);
}

#[tokio::test]
async fn max_tokens_gives_length_and_exact_usage() {
    let (_, finish, completion_tokens) =
        ask(request("Write a long essay about the history of Rome.", 5)
            .build()
            .unwrap())
        .await;
    assert_eq!(finish, Some(FinishReason::Length));
    assert_eq!(completion_tokens, 5);
}

#[tokio::test]
async fn stop_sequence_ends_the_text() {
    let (free, _, _) = ask(
        request("List the numbers from 1 to 10, separated by commas.", 40)
            .build()
            .unwrap(),
    )
    .await;
    // Stop at the first comma the model writes, whatever tokens it spans.
    let cut = free
        .find(',')
        .expect("the unconstrained answer has a comma");
    let mut r = request("List the numbers from 1 to 10, separated by commas.", 40);
    r.stop(StopConfiguration::String(",".into()));
    let (stopped, finish, _) = ask(r.build().unwrap()).await;
    assert_eq!(stopped, free[..cut]);
    assert_eq!(finish, Some(FinishReason::Stop));
}

#[tokio::test]
async fn chinese_and_emoji_arrive_as_whole_characters() {
    let body = json!({
        "model": model_id(SMOLLM2), "stream": true, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "user", "content": "请用中文回答：你好吗？😀"}]
    });
    let resp = post(smollm2(), &body).await;
    let text = resp.text().await.unwrap();
    let mut content = String::new();
    for event in text.split("\n\n").filter(|e| e.starts_with("data: {")) {
        let v: Value = serde_json::from_str(&event[6..]).unwrap();
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "a broken character in {piece:?}"
            );
            content.push_str(piece);
        }
    }
    assert!(
        content
            .chars()
            .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "a Chinese answer: {content:?}"
    );
}

async fn post_raw(body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", smollm2()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn malformed_json_is_a_400_with_an_openai_error_body() {
    let (status, body) = post_raw("{\"model\": \"x\", \"messages\": [").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(body["error"].as_object().unwrap().contains_key("param"));
    assert!(body["error"].as_object().unwrap().contains_key("code"));
}

#[tokio::test]
async fn unknown_model_is_a_404() {
    let (status, body) =
        post_raw(r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    let err = client(smollm2())
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model("gpt-9")
                .messages(vec![user("hi")])
                .build()
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("gpt-9"), "{err}");
}

#[tokio::test]
async fn invalid_fields_name_the_parameter() {
    // A valid request plus one more field, as raw JSON.
    let with = |field: &str| {
        format!(
            r#"{{"model": "{}", "messages": [{{"role": "user", "content": "hi"}}], {field}}}"#,
            model_id(SMOLLM2)
        )
    };
    let (status, body) = post_raw(&with(r#""temperature": 7"#)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "temperature");
    let (status, body) = post_raw(&with(r#""max_tokens": 100000"#)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("4096"),
        "{body}"
    );
}

#[tokio::test]
async fn models_are_listed() {
    let models = client(smollm2()).models().list().await.unwrap();
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, model_id(SMOLLM2));
    let one = client(smollm2())
        .models()
        .retrieve(&model_id(SMOLLM2))
        .await
        .unwrap();
    assert_eq!(one.id, model_id(SMOLLM2));
}

/// A fresh server loads nothing until asked, then loads once for twenty simultaneous requests.
#[tokio::test]
async fn lazy_single_load_under_a_burst() {
    let base = spawn(config_for(SMOLLM2));
    assert_eq!(health(&base).await["student"]["state"], "unloaded");
    assert_eq!(client(&base).models().list().await.unwrap().data.len(), 1);
    assert_eq!(
        health(&base).await["student"]["state"],
        "unloaded",
        "listing models loads nothing"
    );
    let burst = (0..20).map(|i| {
        let c = client(&base);
        async move {
            let req = request(&format!("Say the number {i}."), 2).build().unwrap();
            c.chat()
                .create(req)
                .await
                .map(|r| r.usage.unwrap().completion_tokens)
        }
    });
    for result in futures::future::join_all(burst).await {
        assert!(result.expect("every request is answered") >= 1);
    }
    let h = health(&base).await;
    assert_eq!(h["student"]["state"], "ready");
    assert_eq!(h["student"]["loads"], 1);
    assert_eq!(h["student"]["completed"], 20);
}

/// A client that leaves mid-stream stops its generation; the next request is served.
#[tokio::test]
async fn disconnect_stops_generation_and_frees_the_engine() {
    let base = spawn(config_for(SMOLLM2));
    let body = json!({
        "model": model_id(SMOLLM2), "stream": true, "max_tokens": 3000, "temperature": 1.0, "seed": 1,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon, with many chapters."}]
    });
    let resp = post(&base, &body).await;
    let mut bytes = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        bytes.next().await.expect("stream has started").unwrap();
        seen += 1;
    }
    drop(bytes); // the client goes away

    let mut cancelled = false;
    for _ in 0..100 {
        if health(&base).await["student"]["cancelled"] == 1 {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cancelled,
        "the abandoned generation was not stopped: {}",
        health(&base).await
    );
    let next = client(&base)
        .chat()
        .create(request("Hi!", 3).build().unwrap())
        .await
        .unwrap();
    assert!(next.usage.unwrap().completion_tokens >= 1);
    assert_eq!(health(&base).await["student"]["completed"], 1);
}
