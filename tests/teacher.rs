//! The teacher half on real sockets: a second duet in student mode is the real teacher of a
//! duet in teacher mode and of one in hybrid mode; a fault-injecting upstream written here
//! answers slowly, with 500, 429, 401 or 400, cuts its stream, sends malformed SSE or the
//! wrong content type. For each: what the client receives, and that the next request is
//! served normally. Hybrid fallback is tested in both directions.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::{SMOLLM2, client, config_for, model_id, post, spawn};
use duet::config::{Config, Mode, Policy, TeacherRoute};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The variable holding the test teacher key, and the key itself: it must reach the
/// upstream and appear nowhere else.
const KEY_VAR: &str = "TEACHER_TEST_KEY_FOR_DUET";
const KEY: &str = "sk-test-5ecret-teacher-key";

// ---------------------------------------------------------------------------------------
// A fault-injecting upstream: the requested model name picks the behaviour.

struct FaultUpstream {
    base: String,
    requests: Arc<AtomicUsize>,
    auth_seen: Arc<Mutex<Vec<String>>>,
}

fn fault_upstream() -> &'static FaultUpstream {
    static UPSTREAM: OnceLock<FaultUpstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let requests = Arc::new(AtomicUsize::new(0));
        let auth_seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, a) = (requests.clone(), auth_seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    let (r, a) = (r.clone(), a.clone());
                    tokio::spawn(async move {
                        let _ = serve_fault(socket, r, a).await;
                    });
                }
            })
        });
        FaultUpstream {
            base: format!("http://{}/v1", rx.recv().unwrap()),
            requests,
            auth_seen,
        }
    })
}

async fn read_request(socket: &mut TcpStream) -> std::io::Result<(String, Value)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = socket.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[header_end..header_end + length]).unwrap_or(Value::Null);
    Ok((head, body))
}

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

fn completion_chunk(content: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "healthy",
               "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    )
}

async fn serve_fault(
    mut socket: TcpStream,
    requests: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let (head, body) = read_request(&mut socket).await?;
    requests.fetch_add(1, Ordering::SeqCst);
    if let Some(line) = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
    {
        auth.lock()
            .unwrap()
            .push(line["authorization:".len()..].trim().to_string());
    }
    let model = body["model"].as_str().unwrap_or("").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let json_response = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    match model.as_str() {
        "healthy" if stream => {
            socket.write_all(sse_head.as_bytes()).await?;
            for piece in ["Hello", " from", " upstream"] {
                socket.write_all(&chunk(&completion_chunk(piece))).await?;
            }
            socket.write_all(&chunk("data: [DONE]\n\n")).await?;
            socket.write_all(b"0\r\n\r\n").await?;
        }
        "healthy" => {
            let answer = json!({"id": "up-1", "object": "chat.completion", "created": 1, "model": "healthy",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from upstream"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                "echo_tools": body.get("tools").is_some()});
            socket
                .write_all(json_response("200 OK", "", &answer.to_string()).as_bytes())
                .await?;
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            socket
                .write_all(json_response("200 OK", "", "{}").as_bytes())
                .await?;
        }
        "error500" => {
            socket
                .write_all(
                    json_response(
                        "500 Internal Server Error",
                        "",
                        r#"{"error":{"message":"boom"}}"#,
                    )
                    .as_bytes(),
                )
                .await?
        }
        "ratelimit" => {
            let body = r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#;
            socket
                .write_all(
                    json_response("429 Too Many Requests", "retry-after: 7\r\n", body).as_bytes(),
                )
                .await?
        }
        "unauthorized" => {
            socket
                .write_all(
                    json_response("401 Unauthorized", "", r#"{"error":{"message":"bad key"}}"#)
                        .as_bytes(),
                )
                .await?
        }
        "badrequest" => {
            let body = r#"{"error":{"message":"messages is too short","type":"invalid_request_error","param":"messages","code":null}}"#;
            socket
                .write_all(json_response("400 Bad Request", "", body).as_bytes())
                .await?
        }
        "wrongtype" => {
            let html = "<html>proxy error</html>";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                html.len()
            );
            socket.write_all(resp.as_bytes()).await?
        }
        "cut" => {
            socket.write_all(sse_head.as_bytes()).await?;
            socket
                .write_all(&chunk(&completion_chunk("partial")))
                .await?;
            socket.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Drop the connection without ending the chunked body.
        }
        "malformed" => {
            socket.write_all(sse_head.as_bytes()).await?;
            socket.write_all(&chunk(&completion_chunk("ok"))).await?;
            socket.write_all(&chunk("this is not sse\n\n")).await?;
            socket.write_all(b"0\r\n\r\n").await?;
        }
        _ => {
            socket
                .write_all(
                    json_response(
                        "404 Not Found",
                        "",
                        r#"{"error":{"message":"no such model","code":"model_not_found"}}"#,
                    )
                    .as_bytes(),
                )
                .await?
        }
    }
    socket.shutdown().await
}

// ---------------------------------------------------------------------------------------
// duet instances

fn set_key() {
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| {
        // SAFETY: set once, before any server of this binary reads it.
        unsafe { std::env::set_var(KEY_VAR, KEY) };
    });
}

fn teacher_config(mode: Mode, base: &str, model: &str) -> Config {
    set_key();
    let mut config = config_for(SMOLLM2);
    config.mode = mode;
    config.student.name = "local".into();
    config.teacher.base_url = base.to_string();
    config.teacher.api_key_env = KEY_VAR.into();
    config.teacher.model = model.into();
    config
}

/// Settings for a duet in front of the fault upstream: short limits so `slow` times out.
fn fault_config(mode: Mode, model: &str) -> Config {
    let mut config = teacher_config(mode, &fault_upstream().base, model);
    config.teacher.first_byte_timeout_ms = 800;
    config.teacher.chunk_timeout_ms = 2000;
    config
}

/// A duet in student mode serving SmolLM2: the real teacher.
fn real_teacher() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| spawn(config_for(SMOLLM2)))
}

/// A teacher-mode duet in front of the fault upstream.
fn proxy() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| spawn(fault_config(Mode::Teacher, "healthy")))
}

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0})
}

fn ask_stream(model: &str) -> Value {
    let mut body = ask(model);
    body["stream"] = json!(true);
    body
}

/// After any fault, the same proxy answers a healthy request normally.
async fn still_serves(base: &str) {
    let resp = post(base, ask("healthy")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from upstream");
}

fn user(text: &str) -> async_openai::types::chat::ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

// ---------------------------------------------------------------------------------------
// A real teacher

#[tokio::test]
async fn teacher_mode_relays_a_real_duet_streamed_and_not() {
    let front = spawn(teacher_config(
        Mode::Teacher,
        &format!("{}/v1", real_teacher()),
        &model_id(SMOLLM2),
    ));
    let health: Value = reqwest::get(format!("{front}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        health["student"].is_null(),
        "teacher mode loads no weights: {health}"
    );
    let req = CreateChatCompletionRequestArgs::default()
        .model("local") // the student's name maps to teacher.model in teacher mode
        .messages(vec![user("Name a fruit.")])
        .max_tokens(12u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let relayed = client(&front).chat().create(req.clone()).await.unwrap();
    let mut direct_req = req.clone();
    direct_req.model = model_id(SMOLLM2);
    let direct = client(real_teacher())
        .chat()
        .create(direct_req)
        .await
        .unwrap();
    assert_eq!(
        relayed.choices[0].message.content,
        direct.choices[0].message.content
    );

    let mut stream = client(&front).chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            text.push_str(&c.delta.content.unwrap_or_default());
        }
    }
    assert_eq!(Some(text), direct.choices[0].message.content);

    let resp = post(&front, ask_stream("local")).await;
    assert_eq!(resp.headers()["x-duet-backend"], "teacher");
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn hybrid_routes_by_model_name() {
    let mut config = teacher_config(
        Mode::Hybrid,
        &format!("{}/v1", real_teacher()),
        &model_id(SMOLLM2),
    );
    config.teacher.models = vec![TeacherRoute::new("remote", model_id(SMOLLM2))];
    let hybrid = spawn(config);
    let models = client(&hybrid).models().list().await.unwrap();
    let ids: Vec<_> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["local", model_id(SMOLLM2).as_str(), "remote"]);
    for (model, backend) in [("local", "student"), ("remote", "teacher")] {
        let resp = post(&hybrid, ask(model)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-duet-backend"], backend, "{model}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["choices"][0]["message"]["content"].as_str().is_some());
        let resp = post(&hybrid, ask_stream(model)).await;
        assert_eq!(
            resp.headers()["x-duet-backend"],
            backend,
            "{model} streamed"
        );
        assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
}

// ---------------------------------------------------------------------------------------
// A failing teacher

#[tokio::test]
async fn key_reaches_the_teacher_and_nothing_else() {
    let resp = post(proxy(), ask("unauthorized")).await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(text.contains("refused duet's API key"), "{text}");
    assert!(!text.contains(KEY));
    assert!(
        fault_upstream()
            .auth_seen
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == &format!("Bearer {KEY}"))
    );
    let health = reqwest::get(format!("{}/health", proxy()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!health.contains(KEY));
    still_serves(proxy()).await;
}

#[tokio::test]
async fn unknown_fields_reach_the_teacher_unchanged() {
    let mut body = ask("healthy");
    body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let v: Value = post(proxy(), body).await.json().await.unwrap();
    assert_eq!(v["echo_tools"], true);
}

#[tokio::test]
async fn slow_teacher_is_a_504() {
    let resp = post(proxy(), ask("slow")).await;
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "teacher_timeout");
    still_serves(proxy()).await;
}

#[tokio::test]
async fn teacher_500_is_retried_then_a_502() {
    let before = fault_upstream().requests.load(Ordering::SeqCst);
    let resp = post(proxy(), ask("error500")).await;
    assert_eq!(resp.status(), 502);
    assert!(
        fault_upstream().requests.load(Ordering::SeqCst) - before >= 2,
        "one retry"
    );
    still_serves(proxy()).await;
}

#[tokio::test]
async fn teacher_429_keeps_its_retry_after() {
    let resp = post(proxy(), ask("ratelimit")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    still_serves(proxy()).await;
}

#[tokio::test]
async fn teacher_4xx_comes_back_with_its_status_and_body() {
    let resp = post(proxy(), ask("badrequest")).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "messages is too short");
    still_serves(proxy()).await;
}

#[tokio::test]
async fn wrong_content_type_is_a_502() {
    let resp = post(proxy(), ask("wrongtype")).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text/html"),
        "{v}"
    );
    still_serves(proxy()).await;
}

/// Events already relayed stay; the client then gets an error event and [DONE].
async fn broken_stream(model: &str) {
    let resp = post(proxy(), ask_stream(model)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[0].contains("chat.completion.chunk"));
    let error: Value = serde_json::from_str(&events[1]["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["code"], "teacher_unavailable", "{text}");
    assert_eq!(events[2], "data: [DONE]");
    still_serves(proxy()).await;
}

#[tokio::test]
async fn stream_cut_mid_way_ends_with_an_error_event() {
    broken_stream("cut").await;
}

#[tokio::test]
async fn malformed_sse_ends_with_an_error_event() {
    broken_stream("malformed").await;
}

#[tokio::test]
async fn healthy_stream_is_relayed_event_by_event() {
    let resp = post(proxy(), ask_stream("healthy")).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert_eq!(text.matches("chat.completion.chunk").count(), 3);
    assert!(text.ends_with("data: [DONE]\n\n"));
}

// ---------------------------------------------------------------------------------------
// Hybrid fallback, both directions

#[tokio::test]
async fn teacher_first_falls_back_to_the_student() {
    for failing in ["slow", "error500", "ratelimit"] {
        let mut config = fault_config(Mode::Hybrid, failing);
        config.teacher.policy = Policy::TeacherFirst;
        config.teacher.retries = 0;
        let hybrid = spawn(config);
        let resp = post(&hybrid, ask("local")).await;
        assert_eq!(resp.status(), 200, "{failing}");
        assert_eq!(resp.headers()["x-duet-backend"], "student", "{failing}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["choices"][0]["message"]["content"].as_str().is_some());
    }
}

#[tokio::test]
async fn student_first_hands_the_teacher_what_it_cannot_do() {
    // The student answers one choice per request: asking for two goes to the teacher.
    let hybrid = spawn(fault_config(Mode::Hybrid, "healthy"));
    let mut body = ask("local");
    body["n"] = json!(2);
    let resp = post(&hybrid, body).await;
    assert_eq!(resp.headers()["x-duet-backend"], "teacher");
    // Tool calls and structured output now stay local, as do plain requests.
    let mut body = ask("local");
    body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    body["max_tokens"] = json!(8);
    let resp = post(&hybrid, body).await;
    assert_eq!(resp.headers()["x-duet-backend"], "student");
    let mut body = ask("local");
    body["response_format"] = json!({"type": "json_object"});
    body["max_tokens"] = json!(8);
    let resp = post(&hybrid, body).await;
    assert_eq!(resp.headers()["x-duet-backend"], "student");
    let resp = post(&hybrid, ask("local")).await;
    assert_eq!(resp.headers()["x-duet-backend"], "student");
}

#[tokio::test]
async fn student_that_fails_to_load_hands_over_to_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not really").unwrap();
    let mut config = fault_config(Mode::Hybrid, "healthy");
    config.student.model = broken.display().to_string();
    let hybrid = spawn(config);
    for body in [ask("local"), ask_stream("local")] {
        let resp = post(&hybrid, body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-duet-backend"], "teacher");
    }
    let health: Value = reqwest::get(format!("{hybrid}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["student"]["state"], "failed");
    assert!(
        health["student"]["reason"]
            .as_str()
            .unwrap()
            .contains("GGUF"),
        "{health}"
    );
}
