//! The `duet` binary as a user starts it: it listens at once, loads nothing, and stays
//! small until the first chat request.

mod common;

use std::process::Command;

use common::{Process, start_binary};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts the real binary with `args` on a free port; returns its guard, pid and base URL.
fn start(args: &[&str]) -> (Process, u32, String) {
    start_with(args, &[])
}

/// `start`, with extra environment variables.
fn start_with(args: &[&str], env: &[(&str, &str)]) -> (Process, u32, String) {
    let (guard, base) = start_binary(args, env);
    let pid = guard.0.id();
    (guard, pid, base)
}

#[test]
fn starts_lazily_and_small() {
    let (_guard, pid, base) = start(&[]);
    let health = get_json(&format!("{base}/health"));
    assert_eq!(health["student"]["state"], "unloaded");
    let rss = rss_kib(pid);
    assert!(
        rss < 30 * 1024,
        "RSS before the first request is {rss} KiB, over 30 MiB"
    );
}

/// The model answers a short chat request on the server at `base`.
fn assert_answers(base: &str) {
    let answer = post_json(
        &format!("{base}/v1/chat/completions"),
        &serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]
        }),
    );
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{answer}"
    );
}

/// `student.threads` sizes the pool the model's arithmetic runs on: the calling thread plus
/// `threads - 1` workers, whatever the machine has.
#[test]
fn the_thread_setting_sizes_the_models_pool() {
    for threads in [1, 3] {
        let value = threads.to_string();
        let (_guard, pid, base) = start_with(&[], &[("DUET_STUDENT_THREADS", &value)]);
        assert_answers(&base);
        let workers = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
            .filter(|name| name.starts_with("duet-model-"))
            .count();
        assert_eq!(
            workers,
            threads - 1,
            "pool workers with student.threads = {threads}"
        );
    }
}

/// The footprint estimated before loading is within 15% of the RSS measured after it, and
/// unloading (keep_alive 0) brings RSS back within 20% of where it was before the load.
#[test]
fn estimate_matches_and_unload_returns_the_memory() {
    let (_guard, pid, base) = start(&[]);
    // Idle, as a server is once it has answered its first HTTP requests.
    get_json(&format!("{base}/health"));
    get_json(&format!("{base}/v1/models"));
    let before = rss_kib(pid);
    let body = serde_json::json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4, "keep_alive": 0,
        "messages": [{"role": "user", "content": "Hi"}]});
    post_json(&format!("{base}/v1/chat/completions"), &body);
    let mut health = get_json(&format!("{base}/health"));
    for _ in 0..50 {
        if health["student"]["state"] == "unloaded" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        health = get_json(&format!("{base}/health"));
    }
    assert_eq!(health["student"]["state"], "unloaded");
    let after = rss_kib(pid);
    assert!(
        after as f64 <= before as f64 * 1.2,
        "RSS {before} KiB before loading, {after} KiB after unloading"
    );

    // Load again and keep it, to read the estimate beside the measurement.
    let mut keep = body.clone();
    keep["keep_alive"] = serde_json::json!(-1);
    post_json(&format!("{base}/v1/chat/completions"), &keep);
    let health = get_json(&format!("{base}/health"));
    let estimated = health["student"]["estimated_bytes"].as_f64().unwrap();
    let measured = health["student"]["measured_rss_bytes"].as_f64().unwrap();
    let error = (estimated - measured).abs() / measured;
    assert!(
        error < 0.15,
        "estimate {estimated} vs measured {measured}: {:.0}% off",
        error * 100.0
    );
}

/// A blocking GET for a test that has no async runtime of its own.
fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

fn get_json(url: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

/// `student.kernels` forces a tier: `/health` names the one in use, and the model answers
/// on it; a value that is no tier stops start-up with a message naming the setting.
#[test]
fn the_kernels_setting_picks_the_tier_health_reports() {
    let (_guard, _pid, base) = start_with(&[], &[("DUET_STUDENT_KERNELS", "portable")]);
    assert_answers(&base);
    let health = get_json(&format!("{base}/health"));
    assert_eq!(health["student"]["kernels"], "portable", "{health}");

    let (_guard, _pid, base) = start(&[]);
    let health = get_json(&format!("{base}/health"));
    let best = health["student"]["kernels"].as_str().unwrap().to_string();
    assert!(
        ["avx512", "avx-vnni", "avx2", "portable"].contains(&best.as_str()),
        "{health}"
    );

    let refused = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["serve", "--port", "0"])
        .env("DUET_STUDENT_KERNELS", "avx9")
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{message}");
    assert!(message.contains("student.kernels"), "{message}");
}
