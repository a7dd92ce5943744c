//! Shared test helpers: the real model files and duet servers on 127.0.0.1 port 0.
#![allow(dead_code)] // each test binary uses its own subset

pub mod checkpoint;
pub mod hub;

use std::path::PathBuf;
use std::sync::OnceLock;

use std::sync::Arc;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use duet::backend::ChatBackend;
use duet::config::Config;
use duet::student::Student;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// A model fetched by scripts/fetch-models.sh; a clear failure when it is missing.
pub fn model_path(file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

/// Settings for a test server on an ephemeral loopback port.
pub fn config_for(model_file: &str) -> Config {
    let mut config = Config::default();
    config.server.port = 0;
    config.server.workers = 2;
    config.student.model = model_path(model_file).display().to_string();
    config
}

/// Starts duet on its own thread and runtime (it outlives any one test) and returns its
/// base URL, e.g. `http://127.0.0.1:43121`.
pub fn spawn(config: Config) -> String {
    spawn_with(config, None).0
}

/// [`spawn`], with `student` answering for the student's model when given; also returns the
/// local engine when duet runs its own (for its test hooks).
pub fn spawn_with(
    config: Config,
    student: Option<Arc<dyn ChatBackend>>,
) -> (String, Option<Arc<Student>>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let running = duet::start_with(&config, student).expect("bind a loopback port");
            tx.send((running.addr, running.engine.clone()))
                .expect("report the address");
            running.server.await.expect("server runs");
        })
    });
    let (addr, engine) = rx.recv().expect("server started");
    (format!("http://{addr}"), engine)
}

/// One SmolLM2 server shared by the tests of a binary.
pub fn smollm2() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| spawn(config_for(SMOLLM2)))
}

/// One Qwen2.5-Coder server shared by the tests of a binary.
pub fn qwen() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| spawn(config_for(QWEN)))
}

/// `POST {base}{path}` with `body` as JSON.
pub async fn post_to(base: &str, path: &str, body: impl serde::Serialize) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, checking the framing of every event on the way.
pub fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// The JSON chunks of an SSE body that ends with `data: [DONE]` (checked), in order.
pub fn sse_chunks(body: &str) -> Vec<serde_json::Value> {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// The official-SDK-style client pointed at a duet base URL.
pub fn client(base: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key("not-needed"),
    )
}

/// The model id duet gives a GGUF file: its name without `.gguf`.
pub fn model_id(file: &str) -> String {
    file.trim_end_matches(".gguf").to_string()
}

/// `GET /health` as JSON.
pub async fn health(base: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `POST /v1/chat/completions` with `body` as JSON.
pub async fn post(base: &str, body: impl serde::Serialize) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The chat text of streamed `data:` payloads (the content deltas of choice 0, in order).
pub fn chat_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// The `/metrics` page.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the `/metrics` line that starts with `series` (name and labels).
pub async fn metric(base: &str, series: &str) -> u64 {
    let metrics = metrics_text(base).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {series} in {metrics}"))
        .parse()
        .unwrap()
}

/// A child process stopped with its test: asked with SIGTERM (duet drains, nginx takes its
/// workers along), then killed if it has not gone within 5 seconds.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: a plain signal to a child this test started and has not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real `duet serve` binary on a free port with SmolLM2, `args` and `env`, as a user
/// starts it; its guard and the base URL it prints.
pub fn start_binary(args: &[&str], env: &[(&str, &str)]) -> (Process, String) {
    let model = model_path(SMOLLM2).display().to_string();
    let mut all = vec!["--model", &model];
    all.extend_from_slice(args);
    start_duet(&all, env)
}

/// The real `duet serve` binary on a free port with `args` and `env` (the model too); its
/// guard and the base URL it prints once it listens.
pub fn start_duet(args: &[&str], env: &[(&str, &str)]) -> (Process, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["serve", "--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = Process(child);
    let mut lines = BufReader::new(stdout).lines();
    let base = lines
        .by_ref()
        .take(50)
        .find_map(|line| {
            let line = line.unwrap();
            let at = line.find("http://127.0.0.1:")?;
            let url = line[at..].split_whitespace().next()?;
            Some(
                url.trim_end_matches("/v1")
                    .trim_end_matches('/')
                    .to_string(),
            )
        })
        .expect("duet prints the address it serves");
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (guard, base)
}
