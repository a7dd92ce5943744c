//! Black-box tests of the HTTP edge on a small fake backend (no model file): OpenAI's answer
//! shapes and SSE framing, status codes and error bodies, falling back to the teacher before
//! the first byte, an error after the stream started, and a client that leaves stopping its
//! generation. The fake answers with the words of the last message, so what a client reads
//! can be checked exactly; generation itself is tested on the real models elsewhere.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{chat_text, health, metric, post, spawn_with, sse_events as events};
use duet::backend::{
    ChatBackend, FinishReason, GenEvent, Generation, GenerationRequest, Prompt, PromptRead,
    StudentStatus, Usage,
};
use duet::config::{Config, Mode};
use duet::error::DuetError;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

const MODEL: &str = "echo";

/// Answers with the last message's words, one event each, `delay` apart. A last message
/// `fail after N` sends N words and then an error; a refusing echo answers every request as
/// a full queue does.
struct Echo {
    delay: Duration,
    refuse: bool,
    completed: Arc<AtomicU64>,
    cancelled: Arc<AtomicU64>,
}

impl Echo {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            refuse: false,
            completed: Arc::default(),
            cancelled: Arc::default(),
        })
    }

    fn refusing() -> Arc<Self> {
        Arc::new(Self {
            delay: Duration::ZERO,
            refuse: true,
            completed: Arc::default(),
            cancelled: Arc::default(),
        })
    }
}

impl ChatBackend for Echo {
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'static, Result<Generation, DuetError>> {
        let text = match &request.prompt {
            Prompt::Chat(messages) => messages.last().map(|m| m.content.clone()),
            Prompt::Text(text) => Some(text.clone()),
            _ => None,
        };
        let text = text.unwrap_or_default();
        if self.refuse {
            let e = DuetError::Overloaded("the fake's queue is full".into());
            return Box::pin(async move { Err(e) });
        }
        let fail_after = text
            .strip_prefix("fail after ")
            .and_then(|n| n.parse::<usize>().ok());
        let words: Vec<String> = match fail_after {
            Some(n) => (0..n).map(|i| format!("word{i} ")).collect(),
            None => text.split_inclusive(' ').map(str::to_string).collect(),
        };
        let words: Vec<String> = words
            .into_iter()
            .take(request.max_tokens.unwrap_or(usize::MAX))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(words.len() + 1);
        let (delay, completed, cancelled) =
            (self.delay, self.completed.clone(), self.cancelled.clone());
        let prompt_tokens = text.split_whitespace().count() as u32;
        std::thread::spawn(move || {
            for word in &words {
                std::thread::sleep(delay);
                let text = GenEvent::Text {
                    text: word.clone(),
                    tokens: 1,
                    logprobs: vec![],
                };
                if tx.blocking_send(text).is_err() {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            let last = match fail_after {
                Some(_) => GenEvent::Error(DuetError::Internal("the fake broke".into())),
                None => GenEvent::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Usage::new(prompt_tokens, words.len() as u32),
                },
            };
            if tx.blocking_send(last).is_ok() {
                completed.fetch_add(1, Ordering::SeqCst);
            }
        });
        Box::pin(async move {
            Ok(Generation {
                prompt: PromptRead {
                    tokens: prompt_tokens,
                    truncated: false,
                },
                events: rx,
            })
        })
    }

    fn status(&self) -> StudentStatus {
        let mut status = StudentStatus::unloaded(MODEL.into(), "portable");
        status.completed = self.completed.load(Ordering::SeqCst);
        status.cancelled = self.cancelled.load(Ordering::SeqCst);
        status
    }
}

fn config(mode: Mode) -> Config {
    let mut config = Config {
        mode,
        ..Config::default()
    };
    config.server.port = 0;
    config.server.workers = 1;
    config.student.name = MODEL.into();
    config
}

fn ask(content: &str, stream: bool) -> Value {
    json!({
        "model": MODEL, "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "messages": [{"role": "user", "content": content}],
    })
}

#[tokio::test]
async fn a_whole_answer_has_openais_shape() {
    let (base, _) = spawn_with(config(Mode::Student), Some(Echo::new(Duration::ZERO)));
    let resp = post(&base, ask("one two three", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-duet-backend"], "student");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "one two three");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 6);
}

#[tokio::test]
async fn a_stream_is_framed_as_openai_sse() {
    let (base, _) = spawn_with(config(Mode::Student), Some(Echo::new(Duration::ZERO)));
    let resp = post(&base, ask("alpha beta", true)).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let chunks = common::sse_chunks(&resp.text().await.unwrap());
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id));
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "alpha beta");
    // The last choice chunk ends the answer; the usage chunk comes after it, with no choices.
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert_eq!(finish["delta"], json!({}));
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );
}

#[tokio::test]
async fn errors_have_their_status_and_an_openai_body() {
    let (base, _) = spawn_with(config(Mode::Student), Some(Echo::new(Duration::ZERO)));
    let cases = [
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
        ),
        (json!({"model": MODEL, "messages": "hi"}), 400),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
        ),
    ];
    for (body, status) in cases {
        let resp = post(&base, &body).await;
        assert_eq!(resp.status(), status, "{body}");
        let error: Value = resp.json().await.unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
        assert!(error["error"]["type"].is_string(), "{error}");
    }
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // The server answers normally afterwards.
    assert_eq!(post(&base, ask("still here", false)).await.status(), 200);

    let (full, _) = spawn_with(config(Mode::Student), Some(Echo::refusing()));
    let resp = post(&full, ask("hello", false)).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let error: Value = resp.json().await.unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");
}

#[tokio::test]
async fn an_error_after_the_stream_started_ends_it_properly() {
    let (base, _) = spawn_with(config(Mode::Student), Some(Echo::new(Duration::ZERO)));
    let resp = post(&base, ask("fail after 3", true)).await;
    assert_eq!(resp.status(), 200);
    let events = events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the fake broke"),
        "{error}"
    );
    assert_eq!(chat_text(&events[..events.len() - 2]), "word0 word1 word2 ");
}

#[tokio::test]
async fn a_full_student_hands_over_to_the_teacher_before_the_first_byte() {
    // The teacher is one more duet answering with its own fake.
    let (teacher, _) = spawn_with(config(Mode::Student), Some(Echo::new(Duration::ZERO)));
    let mut hybrid = config(Mode::Hybrid);
    hybrid.teacher.base_url = format!("{teacher}/v1");
    hybrid.teacher.model = MODEL.into();
    // The student refuses as a full queue does.
    let (base, _) = spawn_with(hybrid, Some(Echo::refusing()));

    for stream in [false, true] {
        let resp = post(&base, ask("from the teacher", stream)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-duet-backend"], "teacher");
        let text = resp.text().await.unwrap();
        let text = if stream {
            chat_text(&events(&text))
        } else {
            let body: Value = serde_json::from_str(&text).unwrap();
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(text, "from the teacher");
    }
    assert_eq!(
        metric(
            &base,
            r#"duet_fallbacks_total{from="student",to="teacher"}"#
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_client_that_leaves_stops_its_generation() {
    let echo = Echo::new(Duration::from_millis(20));
    let (base, _) = spawn_with(config(Mode::Student), Some(echo.clone()));
    let words = "w ".repeat(500);
    let resp = post(&base, ask(&words, true)).await;
    let mut body = resp.bytes_stream();
    let mut read = Vec::new();
    while !String::from_utf8_lossy(&read).contains(r#""content":"w"#) {
        read.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert!(read.starts_with(b"data: "));
    drop(body);
    // The fake notices at its next word that nobody reads any more.
    for _ in 0..200 {
        if echo.cancelled.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(echo.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(echo.completed.load(Ordering::SeqCst), 0);
    // What was generated before the client left is charged: leaving just before the end
    // does not dodge a token limit.
    let generated = metric(&base, r#"duet_generated_tokens_total{backend="student"}"#).await;
    assert!(generated >= 1, "{generated} tokens charged");
    assert_eq!(health(&base).await["student"]["cancelled"], 1);
}
