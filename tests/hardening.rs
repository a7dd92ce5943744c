//! Hostile and careless clients on real sockets: API keys, every input limit, CORS, a
//! stalled body, a thousand dropped connections; then the binary itself: secrets never
//! leak into logs, bodies, /health or /metrics, and SIGTERM drains gracefully.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SMOLLM2, config_for, model_id, model_path, post, spawn};
use serde_json::{Value, json};

fn ask(max_tokens: u32) -> Value {
    json!({"model": model_id(SMOLLM2), "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens})
}

async fn post_raw(base: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let mut config = config_for(SMOLLM2);
    config.server.api_keys = vec!["sk-client-test-123".into()];
    let base = spawn(config);
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let resp = c.post(&url).json(&ask(2)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let resp = c
        .post(&url)
        .bearer_auth("sk-client-test-12")
        .json(&ask(2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let status_of = |path: &str| {
        let request = c.get(format!("{base}{path}")).send();
        async move { request.await.unwrap().status() }
    };
    assert_eq!(status_of("/v1/models").await, 401);
    assert_eq!(status_of("/metrics").await, 401);
    assert_eq!(status_of("/health").await, 200, "health stays open");
    assert_eq!(
        status_of("/").await,
        200,
        "the chat page asks for the key itself"
    );
    assert_eq!(status_of("/favicon.ico").await, 200);
    assert_eq!(status_of("/props").await, 401);
    let resp = c
        .post(&url)
        .bearer_auth("sk-client-test-123")
        .json(&ask(2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The SDKs send their api_key the same way.
    let sdk = async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key("sk-client-test-123"),
    );
    assert_eq!(sdk.models().list().await.unwrap().data.len(), 1);
}

/// Every limit and bad input: the status and the words the client gets; then the server
/// still answers normally.
#[tokio::test]
async fn bad_inputs_get_clear_4xx_and_change_nothing() {
    let mut config = config_for(SMOLLM2);
    config.server.max_body_bytes = 4096;
    config.student.context_length = 128;
    config.student.max_new_tokens = 16;
    config.limits.max_messages = 8;
    config.limits.max_tokens = 20;
    let base = spawn(config);
    let m = model_id(SMOLLM2);
    let long = "word ".repeat(200);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("body over the limit", "application/json", vec![b' '; 5000], 413, "4096 bytes"),
        ("not JSON", "application/json", b"{nope".to_vec(), 400, "not valid JSON"),
        ("invalid UTF-8", "application/json", b"{\"model\": \"\xff\"}".to_vec(), 400, "UTF-8"),
        ("form content type", "application/x-www-form-urlencoded", b"a=b".to_vec(), 415, "application/json"),
        ("no model", "application/json", br#"{"messages": []}"#.to_vec(), 400, "`model`"),
        ("empty messages", "application/json", format!(r#"{{"model": "{m}", "messages": []}}"#).into_bytes(), 400, "at least one message"),
        ("too many messages", "application/json",
            json!({"model": m, "messages": vec![json!({"role": "user", "content": "x"}); 9]}).to_string().into_bytes(), 400, "limits.max_messages"),
        ("unknown role", "application/json",
            json!({"model": m, "messages": [{"role": "wizard", "content": "x"}]}).to_string().into_bytes(), 400, "unknown role `wizard`"),
        ("wrong type", "application/json",
            json!({"model": m, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string().into_bytes(), 400, "invalid type"),
        ("prompt beyond the context", "application/json",
            json!({"model": m, "messages": [{"role": "user", "content": long}]}).to_string().into_bytes(), 400, "context is 128 tokens"),
        ("unknown model", "application/json",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string().into_bytes(), 404, "gpt-9"),
    ];
    for (what, content_type, body, status, words) in cases {
        let (got, v) = post_raw(&base, content_type, body).await;
        assert_eq!(got, status, "{what}: {v}");
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no OpenAI error body: {v}"));
        assert!(
            message.contains(words),
            "{what}: {message:?} lacks {words:?}"
        );
        assert!(v["error"].get("type").is_some(), "{what}");
    }
    // max_tokens over the cap is clamped to it.
    let (status, v) = post_raw(&base, "application/json", {
        let mut body = ask(500);
        body["messages"][0]["content"] = json!("Write a long story.");
        body.to_string().into_bytes()
    })
    .await;
    assert_eq!(status, 200);
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() <= 20,
        "{v}"
    );
    // The engine lets go of a request's reservation just after its last event: wait briefly.
    let mut reserved = Value::Null;
    for _ in 0..50 {
        let health: Value = reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reserved = health["memory"]["ledger"]["reserved_bytes"].clone();
        if reserved == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(reserved, 0);
}

#[tokio::test]
async fn cors_is_off_by_default_and_allows_configured_origins() {
    let preflight = |base: String, origin: &'static str| async move {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("{base}/v1/chat/completions"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap()
    };
    let closed = spawn(config_for(SMOLLM2));
    let resp = preflight(closed, "http://localhost:3000").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let mut config = config_for(SMOLLM2);
    config.server.cors_origins = vec!["http://localhost:3000".into()];
    let open = spawn(config);
    let resp = preflight(open.clone(), "http://localhost:3000").await;
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let resp = preflight(open, "http://evil.example").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn a_stalled_body_times_out_and_frees_the_connection() {
    let mut config = config_for(SMOLLM2);
    config.server.read_timeout_ms = 300;
    let base = spawn(config);
    let addr = base.trim_start_matches("http://");
    let mut stalled = TcpStream::connect(addr).unwrap();
    write!(stalled, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\"").unwrap();
    let began = Instant::now();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(began.elapsed() < Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, _) = rt.block_on(post_raw(
        &base,
        "application/json",
        ask(2).to_string().into_bytes(),
    ));
    assert_eq!(status, 200, "others are still served");
}

#[tokio::test]
async fn a_thousand_dropped_connections_leave_nothing_behind() {
    let base = spawn(config_for(SMOLLM2));
    let mut body = ask(200);
    body["stream"] = json!(true);
    for wave in 0..10u64 {
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let (base, body) = (base.clone(), body.clone());
                tokio::spawn(async move {
                    let send = reqwest::Client::new()
                        .post(format!("{base}/v1/chat/completions"))
                        .json(&body)
                        .send();
                    // Leave at a different moment each time: before, during or after the start.
                    let _ = tokio::time::timeout(
                        Duration::from_millis((wave * 7 + i * 13) % 120),
                        async {
                            let mut stream = send.await.ok()?.bytes_stream();
                            futures::StreamExt::next(&mut stream).await
                        },
                    )
                    .await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut health = Value::Null;
    for _ in 0..200 {
        health = reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["memory"]["ledger"]["reserved_bytes"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health["memory"]["ledger"]["reserved_bytes"], 0, "{health}");
    let (status, _) = post_raw(&base, "application/json", ask(2).to_string().into_bytes()).await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------
// The binary

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary; returns it, its base URL, and a channel of every log line it writes.
fn start(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.args(["serve", "--port", "0", "--model"])
        .arg(model_path(SMOLLM2))
        .args(args);
    cmd.env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            BufReader::new(pipe)
                .lines()
                .map_while(Result::ok)
                .for_each(|l| drop(tx.send(l)))
        });
    }
    let mut seen = Vec::new();
    let base = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no address in {seen:?}"));
        if let Some(at) = line.find("http://127.0.0.1:") {
            break line[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches("/v1")
                .trim_end_matches('/')
                .to_string();
        }
        seen.push(line);
    };
    (Child(child), base, rx)
}

#[test]
fn secrets_never_leak() {
    const TEACHER_KEY: &str = "sk-teacher-LEAKCHECK-7f3a9";
    const CLIENT_KEY: &str = "sk-client-LEAKCHECK-51c2e";
    const WRONG_KEY: &str = "sk-wrong-LEAKCHECK-0d44b";
    // The teacher is a closed port: every teacher request fails, and its errors are checked too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (child, base, logs) = start(
        &["--mode", "hybrid"],
        &[
            ("RUST_LOG", "debug"),
            ("TEACHER_API_KEY", TEACHER_KEY),
            ("TEACHER_BASE_URL", &format!("http://{closed}/v1")),
            ("DUET_SERVER_API_KEYS", CLIENT_KEY),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bodies: Vec<String> = rt.block_on(async {
        let c = reqwest::Client::new();
        let mut seen = Vec::new();
        let url = format!("{base}/v1/chat/completions");
        let teacher_model = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
        let tools = json!({"model": model_id(SMOLLM2), "tools": [{"type": "function", "function": {"name": "f"}}],
                           "messages": [{"role": "user", "content": "hi"}]});
        for (key, body) in [
            (CLIENT_KEY, ask(3)),
            (CLIENT_KEY, teacher_model.clone()),
            (CLIENT_KEY, tools),
            (WRONG_KEY, ask(3)),
            (WRONG_KEY, teacher_model),
        ] {
            let resp = c.post(&url).bearer_auth(key).json(&body).send().await.unwrap();
            let headers = format!("{:?}", resp.headers());
            seen.push(format!("{headers} {}", resp.text().await.unwrap()));
        }
        for path in ["/health", "/metrics", "/v1/models"] {
            let resp = c.get(format!("{base}{path}")).bearer_auth(CLIENT_KEY).send().await.unwrap();
            seen.push(resp.text().await.unwrap());
        }
        seen
    });
    drop(child);
    std::thread::sleep(Duration::from_millis(200));
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("student loaded")),
        "the logs were captured"
    );
    for secret in [TEACHER_KEY, CLIENT_KEY, WRONG_KEY] {
        for text in bodies.iter().chain(&logs) {
            assert!(!text.contains(secret), "{secret} leaked into: {text}");
        }
    }
}

#[test]
fn sigterm_lets_short_answers_finish_and_ends_long_streams_cleanly() {
    let (mut child, base, _logs) = start(
        &[],
        &[
            ("DUET_SERVER_SHUTDOWN_GRACE_MS", "1500"),
            ("RUST_LOG", "info"),
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let long = {
        let base = base.clone();
        rt.spawn(async move {
            let mut body = ask(3000);
            body["stream"] = json!(true);
            // Greedy, this prompt runs past 600 tokens: still going when the grace ends.
            body["messages"][0]["content"] = json!("Write a very long story about the sea.");
            body["temperature"] = json!(0);
            let resp = post(&base, &body).await;
            resp.text().await.unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(1500)); // the long stream is running
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let began = Instant::now();
    let text = rt.block_on(long).unwrap();
    assert!(
        text.contains("shutting_down"),
        "the stream ends with an error event: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(began.elapsed() < Duration::from_secs(8));
    assert!(
        TcpStream::connect(base.trim_start_matches("http://")).is_err(),
        "no longer listening"
    );
}
