//! Tool calls from the local model, as agents send them: `tools` with each `tool_choice`,
//! streamed and not, on both real models, the calls' arguments held to their schemas; a
//! tool's result sent back for the answer; malformed tools are 400s.

mod common;

use common::{QWEN, SMOLLM2, model_id, post, qwen, smollm2};
use serde_json::{Value, json};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40},
                               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "The local time in a time zone.",
            "parameters": {"type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 40}},
                "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn request(model: &str, choice: Value, seed: u64, stream: bool) -> Value {
    json!({
        "model": model_id(model),
        "messages": [{"role": "user", "content": "What is the weather like in Paris right now?"}],
        "tools": tools(),
        "tool_choice": choice,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 100,
        "stream": stream,
    })
}

/// A call as a client checks it: a known function, arguments a JSON string of an object
/// that follows its schema.
fn assert_call(call: &Value) -> String {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {call}"));
    match name.as_str() {
        "get_weather" => {
            assert!(arguments["city"].is_string(), "{call}");
            assert!(
                ["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()),
                "{call}"
            );
            assert_eq!(arguments.as_object().unwrap().len(), 2, "{call}");
        }
        "get_time" => assert!(arguments["zone"].is_string(), "{call}"),
        other => panic!("unknown function {other}"),
    }
    name
}

#[tokio::test]
async fn required_calls_are_valid_at_temperature_one_on_both_models() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        for seed in 1..=4 {
            let body: Value = post(base, request(model, json!("required"), seed, false))
                .await
                .json()
                .await
                .unwrap();
            let choice = &body["choices"][0];
            assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
            let calls = choice["message"]["tool_calls"].as_array().unwrap();
            assert!(!calls.is_empty(), "{body}");
            for call in calls {
                assert_call(call);
            }
        }
    }
}

#[tokio::test]
async fn a_named_function_is_the_one_called() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        let choice = json!({"type": "function", "function": {"name": "get_time"}});
        let body: Value = post(base, request(model, choice, 5, false))
            .await
            .json()
            .await
            .unwrap();
        let calls = body["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap();
        assert_eq!(calls.len(), 1, "{body}");
        assert_eq!(assert_call(&calls[0]), "get_time");
        assert!(body["choices"][0]["message"]["content"].is_null(), "{body}");
    }
}

#[tokio::test]
async fn auto_gives_text_or_valid_calls_and_none_gives_text() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        for seed in 1..=3 {
            let body: Value = post(base, request(model, json!("auto"), seed, false))
                .await
                .json()
                .await
                .unwrap();
            let choice = &body["choices"][0];
            match choice["message"]["tool_calls"].as_array() {
                Some(calls) => {
                    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
                    calls.iter().for_each(|c| {
                        assert_call(c);
                    });
                }
                None => assert!(choice["message"]["content"].is_string(), "{body}"),
            }
        }
        let body: Value = post(base, request(model, json!("none"), 1, false))
            .await
            .json()
            .await
            .unwrap();
        assert!(
            body["choices"][0]["message"]["tool_calls"].is_null(),
            "{body}"
        );
        assert!(
            body["choices"][0]["message"]["content"].is_string(),
            "{body}"
        );
    }
}

#[tokio::test]
async fn streamed_calls_arrive_as_openai_deltas() {
    for (base, model) in [(smollm2(), SMOLLM2), (qwen(), QWEN)] {
        let resp = post(base, request(model, json!("required"), 9, true)).await;
        assert_eq!(resp.status(), 200);
        let chunks = common::sse_chunks(&resp.text().await.unwrap());
        // As clients put them together: by index, the first delta with id, type and name,
        // the arguments in pieces.
        let mut calls: Vec<Value> = Vec::new();
        for delta in chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
            .flatten()
        {
            let index = delta["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert!(
                    delta["id"].is_string() && delta["function"]["name"].is_string(),
                    "{delta}"
                );
                calls.push(delta.clone());
            } else {
                let arguments = &mut calls[index]["function"]["arguments"];
                *arguments = json!(format!(
                    "{}{}",
                    arguments.as_str().unwrap(),
                    delta["function"]["arguments"].as_str().unwrap()
                ));
            }
        }
        assert!(!calls.is_empty(), "{chunks:?}");
        for call in &calls {
            assert_call(call);
        }
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|r| !r.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
    }
}

#[tokio::test]
async fn a_tool_result_is_read_back_into_the_answer() {
    let body: Value = post(
        qwen(),
        json!({
            "model": model_id(QWEN),
            "tools": tools(),
            // The answer now, in words: a 0.5B model offered the tool again tends to call it
            // again.
            "tool_choice": "none",
            "temperature": 0,
            "max_tokens": 60,
            "messages": [
                {"role": "user", "content": "What is the weather like in Paris right now?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"}
            ]
        }),
    )
    .await
    .json()
    .await
    .unwrap();
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"));
    assert!(
        answer.contains("21"),
        "the answer uses the tool's result: {answer}"
    );
}

#[tokio::test]
async fn malformed_tools_and_tool_messages_are_400s() {
    for (body, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "42"}]}),
            "messages[0].tool_call_id",
        ),
    ] {
        let mut request = json!({"model": model_id(QWEN), "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in body.as_object().unwrap() {
            request[k] = v.clone();
        }
        let resp = post(qwen(), request).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }
}
