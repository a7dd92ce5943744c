//! The `duet` binary as a user starts it: it listens at once, loads nothing, and stays
//! small until the first chat request.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{SMOLLM2, model_path};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn starts_lazily_and_small() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["serve", "--port", "0", "--model"])
        .arg(model_path(SMOLLM2))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    let _guard = Server(child);
    let mut address = None;
    for line in BufReader::new(stdout).lines().take(50) {
        let line = line.unwrap();
        if let Some(at) = line.find("http://127.0.0.1:") {
            address = Some(
                line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches("/v1")
                    .to_string(),
            );
            break;
        }
    }
    let base = address.expect("duet prints the address it serves");
    let health = get_json(&format!("{base}/health"));
    assert_eq!(health["student"]["state"], "unloaded");
    let rss = rss_kib(pid);
    assert!(
        rss < 30 * 1024,
        "RSS before the first request is {rss} KiB, over 30 MiB"
    );
}

/// A blocking GET for a test that has no async runtime of its own.
fn get_json(url: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}
