//! Structured output from the local model: `response_format` with a JSON schema or
//! `json_object`, held to it while sampling, on both real models at temperature 1 across
//! seeds, streamed and not; schemas that cannot be followed are 400s that leave the server
//! working.

mod common;

use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs, ResponseFormat,
    ResponseFormatJsonSchema,
};
use common::{QWEN, SMOLLM2, client, model_id, post, qwen, smollm2, sse_events};
use serde_json::{Value, json};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "languages": {
                "type": "array",
                "items": {"type": "string", "enum": ["Rust", "Python", "Go", "C"]},
                "maxItems": 3
            },
            "retired": {"type": "boolean"}
        },
        "required": ["name", "age", "languages", "retired"],
        "additionalProperties": false
    })
}

/// What a client checking the schema by hand would check.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "languages", "name", "retired"], "{text}");
    assert!(
        o["name"].as_str().is_some_and(|n| n.chars().count() <= 40),
        "{text}"
    );
    assert!(o["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
    let languages = o["languages"].as_array().unwrap();
    assert!(languages.len() <= 3, "{text}");
    for l in languages {
        assert!(
            ["Rust", "Python", "Go", "C"].contains(&l.as_str().unwrap()),
            "{text}"
        );
    }
    assert!(o["retired"].is_boolean(), "{text}");
}

fn person_request(model: &str, seed: u64, stream: bool) -> Value {
    json!({
        "model": model_id(model),
        "messages": [{"role": "user", "content": "Invent a programmer and describe them."}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 120,
        "stream": stream,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "strict": true, "schema": person_schema()}}
    })
}

#[tokio::test]
async fn schema_bound_answers_are_valid_at_temperature_one_on_both_models() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        for seed in 1..=5 {
            let resp = post(base, person_request(model, seed, false)).await;
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
            assert_person(body["choices"][0]["message"]["content"].as_str().unwrap());
        }
    }
}

#[tokio::test]
async fn streamed_schema_bound_answers_are_valid() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        for seed in 11..=12 {
            let resp = post(base, person_request(model, seed, true)).await;
            assert_eq!(resp.status(), 200);
            let events = sse_events(&resp.text().await.unwrap());
            assert_eq!(events.last().unwrap(), "[DONE]");
            assert_person(&common::chat_text(&events));
        }
    }
}

#[tokio::test]
async fn json_object_answers_are_objects() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        for seed in 21..=23 {
            let body: Value = post(
                base,
                json!({
                    "model": model_id(model),
                    "messages": [{"role": "user", "content": "List three fruits and their colours as JSON."}],
                    "temperature": 1.0, "seed": seed, "max_tokens": 200,
                    "response_format": {"type": "json_object"}
                }),
            )
            .await
            .json()
            .await
            .unwrap();
            let text = body["choices"][0]["message"]["content"].as_str().unwrap();
            if body["choices"][0]["finish_reason"] == "stop" {
                let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
                assert!(v.is_object(), "{text}");
            } else {
                // Cut by max_tokens: still the beginning of an object.
                assert!(text.trim_start().starts_with('{'), "{text}");
            }
        }
    }
}

/// The Rust counterpart of the official SDK's `response_format`: the request the SDK
/// builds is accepted and its answer parses.
#[tokio::test]
async fn the_sdk_request_gets_a_schema_valid_answer() {
    let req = CreateChatCompletionRequestArgs::default()
        .model(model_id(QWEN))
        .messages(vec![
            ChatCompletionRequestUserMessageArgs::default()
                .content("Invent a programmer and describe them.")
                .build()
                .unwrap()
                .into(),
        ])
        .temperature(1.0)
        .seed(7)
        .max_tokens(120u32)
        .response_format(ResponseFormat::JsonSchema {
            json_schema: ResponseFormatJsonSchema {
                name: "person".into(),
                description: None,
                schema: person_schema(),
                strict: Some(true),
            },
        })
        .build()
        .unwrap();
    let resp = client(qwen()).chat().create(req).await.unwrap();
    assert_person(resp.choices[0].message.content.as_deref().unwrap());
}

#[tokio::test]
async fn schemas_that_cannot_be_followed_are_400s_and_the_server_goes_on() {
    let base = qwen();
    for (format, param, says) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "string", "pattern": "(unclosed"}}}),
            "response_format",
            "",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
            "response_format",
            "frobnicate",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://example.com/s.json"}}}),
            "response_format",
            "$ref",
        ),
        (json!({"type": "yaml"}), "response_format.type", "yaml"),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "json_schema",
        ),
    ] {
        let resp = post(
            base,
            json!({"model": model_id(QWEN), "max_tokens": 8, "response_format": format,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(resp.status(), 400, "{format}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    let resp = post(base, person_request(QWEN, 3, false)).await;
    assert_eq!(resp.status(), 200, "the server still answers");
}
