//! Code completion as IDE plugins ask for it, with the real Qwen2.5-Coder model: OpenAI's
//! legacy `/v1/completions` through async-openai (suffix, logprobs, echo, prompt arrays) and
//! as Continue, Tabby and Zed send it; llama.cpp's `/infill`, `/completion` and `/props` as
//! llama.vim, llama.vscode and Tabby's llama.cpp backend send them; chat's logprobs and
//! logit_bias; and every refusal.

mod common;

use async_openai::types::chat::Prompt;
use async_openai::types::completions::CreateCompletionRequestArgs;
use common::{
    QWEN, SMOLLM2, client, config_for, model_id, post, post_to, qwen, smollm2, spawn, sse_events,
};
use duet::config::Mode;
use serde_json::{Value, json};

const PREFIX: &str = "def add(a, b):\n    ";
const SUFFIX: &str = "\n\nprint(add(2, 3))\n";

fn fim_prompt(prefix: &str, suffix: &str) -> String {
    format!("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
}

async fn json_of(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn the_sdk_fills_in_the_middle_from_a_suffix_and_stops_there() {
    let request = CreateCompletionRequestArgs::default()
        .model(model_id(QWEN))
        .prompt(PREFIX)
        .suffix(SUFFIX)
        .max_tokens(48u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let answer = client(qwen()).completions().create(request).await.unwrap();
    assert_eq!(answer.object, "text_completion");
    let text = &answer.choices[0].text;
    assert!(text.contains("return a + b"), "{text:?}");
    assert!(
        !text.contains("print"),
        "the middle ends before the suffix: {text:?}"
    );
    assert_eq!(
        format!("{:?}", answer.choices[0].finish_reason),
        "Some(Stop)"
    );
}

#[tokio::test]
async fn a_stop_string_ending_the_middle_keeps_its_line() {
    for stop in ["\n", "\n\n"] {
        let body = json_of(
            post_to(
                qwen(),
                "/v1/completions",
                json!({"model": model_id(QWEN), "prompt": PREFIX, "suffix": SUFFIX,
                       "stop": stop, "max_tokens": 32, "temperature": 0}),
            )
            .await,
        )
        .await;
        let text = body["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("return a + b"), "stop {stop:?}: {text:?}");
    }
}

#[tokio::test]
async fn the_sdk_gets_logprobs_echo_and_one_choice_per_prompt() {
    let request = CreateCompletionRequestArgs::default()
        .model(model_id(QWEN))
        .prompt(Prompt::StringArray(vec![
            "The capital of France is".into(),
            "def fib(n):".into(),
        ]))
        .max_tokens(6u32)
        .temperature(0.0)
        .logprobs(2u8)
        .echo(true)
        .build()
        .unwrap();
    let answer = client(qwen()).completions().create(request).await.unwrap();
    assert_eq!(answer.choices.len(), 2);
    for (i, prompt) in ["The capital of France is", "def fib(n):"]
        .iter()
        .enumerate()
    {
        let choice = answer.choices.iter().find(|c| c.index == i as u32).unwrap();
        assert!(choice.text.starts_with(prompt), "echoed: {:?}", choice.text);
        let lp = choice.logprobs.as_ref().expect("logprobs");
        assert_eq!(lp.tokens.len(), 6, "one entry per generated token");
        assert_eq!(lp.token_logprobs.len(), 6);
        assert!(
            lp.token_logprobs
                .iter()
                .all(|l| l.is_some_and(|l| l <= 0.0))
        );
        let generated: String = lp.tokens.concat();
        assert!(choice.text.ends_with(&generated), "{:?}", choice.text);
        assert!(lp.text_offset.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(lp.text_offset[0] as usize, prompt.chars().count());
        for top in &lp.top_logprobs {
            assert!(top.as_object().unwrap().len() <= 2);
        }
    }
    assert!(answer.choices[0].text.contains("Paris"));
    let usage = answer.usage.unwrap();
    assert_eq!(usage.completion_tokens, 12);
}

#[tokio::test]
async fn a_raw_fim_prompt_reads_the_fim_markers_as_single_tokens() {
    // The prompt Continue builds client-side and the one duet builds from `suffix` are the
    // same tokens: the markers written in text became the model's FIM tokens.
    let raw = json_of(
        post_to(
            qwen(),
            "/v1/completions",
            json!({"model": model_id(QWEN), "prompt": fim_prompt(PREFIX, SUFFIX),
                   "temperature": 0, "max_tokens": 12}),
        )
        .await,
    )
    .await;
    let built = json_of(
        post_to(
            qwen(),
            "/v1/completions",
            json!({"model": model_id(QWEN), "prompt": PREFIX, "suffix": SUFFIX,
                   "temperature": 0, "max_tokens": 12}),
        )
        .await,
    )
    .await;
    assert_eq!(
        raw["usage"]["prompt_tokens"],
        built["usage"]["prompt_tokens"]
    );
    let raw_text = raw["choices"][0]["text"].as_str().unwrap();
    assert!(raw_text.starts_with("return a + b"), "{raw_text:?}");
}

#[tokio::test]
async fn continue_autocomplete_streams_text_completion_chunks() {
    let stops = [
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<|im_start|>",
        "<|im_end|>",
    ];
    let resp = post_to(
        qwen(),
        "/v1/completions",
        json!({"model": model_id(QWEN), "prompt": fim_prompt(PREFIX, SUFFIX),
               "max_tokens": 24, "temperature": 0.01, "top_p": 1, "frequency_penalty": 0,
               "presence_penalty": 0, "stop": stops, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let chunks = common::sse_chunks(&resp.text().await.unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(text.contains("return a + b"), "{text:?}");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert!(finish["finish_reason"].is_string(), "{finish}");
}

#[tokio::test]
async fn tabby_stops_at_the_first_finish_reason_before_done() {
    let resp = post_to(
        qwen(),
        "/v1/completions",
        json!({"model": model_id(QWEN), "prompt": PREFIX, "suffix": SUFFIX,
               "max_tokens": 32, "temperature": 0.1, "stream": true, "presence_penalty": 0}),
    )
    .await;
    let events = sse_events(&resp.text().await.unwrap());
    let mut text = String::new();
    let mut finished = false;
    for event in &events {
        if event == "[DONE]" {
            break;
        }
        // Tabby parses every event strictly as {choices: [{text, finish_reason}]}.
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().expect("text on every choice"));
        if !choice["finish_reason"].is_null() {
            finished = true;
            break;
        }
    }
    assert!(finished, "a finish_reason arrives before [DONE]");
    assert!(text.contains("return a + b"), "{text:?}");
}

#[tokio::test]
async fn zed_edit_prediction_reads_a_whole_text_completion() {
    let body = json_of(
        post_to(
            qwen(),
            "/v1/completions",
            json!({"model": model_id(QWEN), "prompt": fim_prompt("x = [1, 2, 3]\ntotal = ", "\n"),
                   "max_tokens": 8, "stop": ["\n"]}),
        )
        .await,
    )
    .await;
    for field in ["id", "object", "created", "model", "usage"] {
        assert!(!body[field].is_null(), "{field} in {body}");
    }
    assert!(body["choices"][0]["text"].is_string());
    assert!(!body["choices"][0]["text"].as_str().unwrap().contains('\n'));
}

#[tokio::test]
async fn max_tokens_defaults_to_sixteen() {
    let body = json_of(
        post_to(
            qwen(),
            "/v1/completions",
            json!({"model": model_id(QWEN), "prompt": "Once upon a time", "temperature": 0,
                   "logit_bias": {"151643": -100}}),
        )
        .await,
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn llama_vim_infill_warms_up_then_reuses_the_file_it_read() {
    let file_before: String = (0..40)
        .map(|i| format!("def helper_{i}(x):\n    return x * {i}\n\n"))
        .collect();
    let infill = |prompt: &str, n_predict: i64| {
        json!({
            "input_prefix": format!("{file_before}def add(a, b):\n"),
            "input_suffix": SUFFIX,
            "input_extra": [{"text": "def sub(a, b):\n    return a - b\n", "filename": "ops.py", "time": 1}],
            "prompt": prompt, "n_predict": n_predict, "n_indent": 4, "top_k": 40, "top_p": 0.99,
            "stream": false, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": true,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1500,
            "response_fields": ["content", "timings/prompt_n", "timings/predicted_n",
                                "timings/predicted_ms", "truncated", "tokens_cached"],
        })
    };
    // The warm-up on a cursor move: read the prompt, generate nothing.
    let warm = json_of(post_to(qwen(), "/infill", infill("    ", 0)).await).await;
    assert_eq!(warm["content"], "");
    assert_eq!(warm["timings/predicted_n"], 0);
    // A keystroke later: only the tokens after the edit are read again.
    let answer = json_of(post_to(qwen(), "/infill", infill("    r", 64)).await).await;
    let content = answer["content"].as_str().unwrap();
    assert!(content.starts_with("eturn a + b"), "{content:?}");
    assert!(!content.contains("print"), "{content:?}");
    assert_eq!(answer["truncated"], false);
    let cached = answer["tokens_cached"].as_u64().unwrap();
    let read = answer["timings/prompt_n"].as_u64().unwrap();
    assert!(
        cached > 500 && read < 40,
        "cached {cached}, read again {read}"
    );
    assert_eq!(
        answer.as_object().unwrap().len(),
        6,
        "only the response_fields asked for: {answer}"
    );
}

#[tokio::test]
async fn llama_cpp_completion_streams_content_events_until_stop() {
    let resp = post_to(
        qwen(),
        "/completion",
        json!({"prompt": "def fib(n):", "n_predict": 8, "stream": true, "seed": 1,
               "temperature": 0, "penalty_last_n": 0, "presence_penalty": 0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "llama.cpp sends none"
    );
    let events: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (last, pieces) = events.split_last().unwrap();
    assert!(
        pieces
            .iter()
            .all(|e| e["stop"] == false && e["content"].is_string())
    );
    assert_eq!(last["stop"], true);
    assert_eq!(last["tokens_predicted"], 8);
    assert!(last["timings"]["predicted_ms"].as_f64().unwrap() > 0.0);
    let text: String = pieces
        .iter()
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert!(!text.is_empty());

    let whole = json_of(
        post_to(
            qwen(),
            "/completion",
            json!({"prompt": "def fib(n):", "n_predict": 8, "temperature": 0}),
        )
        .await,
    )
    .await;
    assert_eq!(
        whole["content"].as_str().unwrap(),
        text,
        "streamed or not, the same text"
    );
}

#[tokio::test]
async fn props_reports_the_context_without_loading_anything() {
    let base = spawn(config_for(QWEN));
    let props: Value = reqwest::get(format!("{base}/props"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 4096);
    assert_eq!(props["chat_template_caps"]["supports_tool_calls"], true);
    let health = common::health(&base).await;
    assert_eq!(health["student"]["state"], "unloaded");
}

#[tokio::test]
async fn chat_reports_logprobs_and_honours_logit_bias() {
    let ask = |extra: Value| {
        let mut body = json!({"model": model_id(QWEN), "temperature": 0, "max_tokens": 5,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let answer =
        json_of(post(qwen(), ask(json!({"logprobs": true, "top_logprobs": 3}))).await).await;
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 5);
    let first = &content[0];
    assert!(first["logprob"].as_f64().unwrap() <= 0.0);
    assert!(first["bytes"].is_array());
    let top = first["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(
        top[0]["token"], first["token"],
        "greedy picks the likeliest"
    );

    // A bias of 100 forces a token: its text, read back from a token-id prompt, is what
    // the answer starts with.
    let echo = json_of(
        post_to(
            qwen(),
            "/v1/completions",
            json!({"model": model_id(QWEN), "prompt": [15], "max_tokens": 0, "echo": true}),
        )
        .await,
    )
    .await;
    let forced_text = echo["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!forced_text.is_empty());
    let forced = json_of(
        post(
            qwen(),
            ask(json!({"logit_bias": {"15": 100}, "max_tokens": 1})),
        )
        .await,
    )
    .await;
    assert_eq!(
        forced["choices"][0]["message"]["content"],
        forced_text.as_str()
    );
}

#[tokio::test]
async fn every_refusal_is_a_400_naming_its_field() {
    let model = model_id(QWEN);
    let seventeen: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let cases = [
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "n": 2}),
            "n",
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "best_of": 2}),
            "best_of",
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "logprobs": 6}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "stop": seventeen}),
            "stop",
        ),
        ("/v1/completions", json!({"model": model}), "prompt"),
        (
            "/v1/completions",
            json!({"model": model, "prompt": [999_999]}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "suffix": "y", "echo": true}),
            "echo",
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "x", "logit_bias": {"999999": 1}}),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 30, "logprobs": true}),
            "top_logprobs",
        ),
        ("/completion", json!({"n_predict": 4}), "prompt"),
        (
            "/infill",
            json!({"input_prefix": "x", "n_probs": 99}),
            "n_probs",
        ),
    ];
    for (path, body, param) in cases {
        let resp = post_to(qwen(), path, &body).await;
        assert_eq!(resp.status(), 400, "{path} {body}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{path} {body}: {error}");
    }
    // A model without FIM tokens cannot fill in the middle.
    let resp = post_to(
        smollm2(),
        "/v1/completions",
        json!({"model": model_id(SMOLLM2), "prompt": "a", "suffix": "b"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fill-in-the-middle"),
        "{error}"
    );
}

#[tokio::test]
async fn teacher_mode_sends_completions_upstream() {
    let mut config = config_for(QWEN);
    config.mode = Mode::Teacher;
    config.teacher.base_url = format!("{}/v1", qwen());
    config.teacher.model = model_id(QWEN);
    let relay = spawn(config);
    let resp = post_to(
        &relay,
        "/v1/completions",
        json!({"model": model_id(QWEN), "prompt": "def add(a, b):", "max_tokens": 4,
               "temperature": 0}),
    )
    .await;
    assert_eq!(resp.headers()["x-duet-backend"], "teacher");
    let body = json_of(resp).await;
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 4);
}
