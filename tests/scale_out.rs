//! Several replicas as one service, with the real components: two duet processes behind
//! nginx (running the shipped `deploy/nginx/duet.conf`), sharing their rate limits through
//! a real `redis-server`; counted from the clients' side. Each client has its own loopback
//! address (127.0.0.2, 127.0.0.3, ...), as different machines would. nginx and Redis come
//! from Debian's packages (`scripts/install-scale-out.sh`, which `scripts/test.sh` runs).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Process, start_binary};

/// Requests a client may send per minute in these tests.
const PER_MINUTE: usize = 20;

fn need(program: &str) -> String {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|path| Path::new(path).is_file())
        .unwrap_or_else(|| panic!("{program} is missing: run scripts/install-scale-out.sh"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `redis-server` on `port`, without persistence, once it answers PING.
fn start_redis(port: u16) -> Process {
    let child = Command::new(need("redis-server"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let redis = Process(child);
    wait_for("redis-server", || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let mut pong = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut pong).is_ok() && &pong == b"+PONG\r\n"
    });
    redis
}

/// Waits up to 10 seconds for `started` to hold.
fn wait_for(what: &str, started: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The duet binary on a free port with `env`; its guard and base URL.
fn start_duet(env: &[(&str, &str)]) -> (Process, String) {
    start_binary(&[], env)
}

/// A replica sharing its limits through Redis at `redis_port`, trusting nginx (127.0.0.1).
fn start_replica(redis_port: u16) -> (Process, String) {
    let url = format!("redis://127.0.0.1:{redis_port}/");
    start_duet(&[
        ("DUET_LIMITS_BACKEND", "redis"),
        ("DUET_LIMITS_REDIS_URL", &url),
        ("DUET_LIMITS_REQUESTS_PER_MINUTE", &PER_MINUTE.to_string()),
        ("DUET_SERVER_TRUSTED_PROXIES", "127.0.0.1"),
    ])
}

/// nginx running `deploy/nginx/duet.conf`, its two `server duet-...` lines pointing at
/// `replicas`; its base URL. One process (no master and workers), so that stopping it
/// leaves nothing behind.
fn start_nginx(dir: &Path, replicas: [&str; 2]) -> (Process, String) {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/duet.conf"),
    )
    .unwrap();
    let port = free_port();
    let mut replicas = replicas.iter();
    let conf: String = shipped
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("server duet-") {
                let address = replicas.next().expect("two replicas in the shipped config");
                let rest = trimmed.split_once(' ').unwrap().1;
                let rest = rest.split_once(' ').map_or(";", |(_, r)| r);
                format!(
                    "    server {} {rest}",
                    address.trim_start_matches("http://")
                )
            } else if trimmed.starts_with("listen ") {
                format!("    listen 127.0.0.1:{port};")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        replicas.next().is_none(),
        "the shipped config names both replicas"
    );
    std::fs::write(dir.join("duet.conf"), conf).unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/duet.conf;\n}}\n"
        ),
    )
    .unwrap();
    let child = Command::new(need("nginx"))
        .args(["-p", &d.to_string(), "-c"])
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nginx = Process(child);
    wait_for("nginx", || TcpStream::connect(("127.0.0.1", port)).is_ok());
    (nginx, format!("http://127.0.0.1:{port}"))
}

/// An HTTP client whose connections come from `from` (a loopback address of its own).
fn client_at(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(from))
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// One short chat request (one generated token); its status.
async fn ask(client: &reqwest::Client, base: &str, headers: &[(&str, String)]) -> u16 {
    send(client, base, headers).await.status().as_u16()
}

/// [`ask`], whole answer.
async fn send(
    client: &reqwest::Client,
    base: &str,
    headers: &[(&str, String)],
) -> reqwest::Response {
    let mut request = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}],
        }));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.unwrap()
}

/// Statuses of `n` requests, each in a conversation of its own (so nginx spreads them).
async fn ask_many(client: &reqwest::Client, base: &str, n: usize, tag: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..n {
        let session = vec![("x-session-id", format!("{tag}-{i}"))];
        statuses.push(ask(client, base, &session).await);
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// Chat requests a replica answered (any status).
async fn answered(base: &str) -> u64 {
    common::metrics_text(base)
        .await
        .lines()
        .filter(|l| l.starts_with("duet_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Checks the replicas' Redis could not answer, in all.
async fn redis_failures(replicas: &[&str]) -> u64 {
    let mut sum = 0;
    for replica in replicas {
        sum += common::metric(replica, "duet_limits_redis_failures_total").await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_nginx_share_limits_through_redis() {
    let redis_port = free_port();
    let mut redis = start_redis(redis_port);
    let (_a, replica_a) = start_replica(redis_port);
    let (_b, replica_b) = start_replica(redis_port);
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, front) = start_nginx(dir.path(), [&replica_a, &replica_b]);

    // One client, spread over both replicas, gets its 20 a minute in all, not 20 each.
    let first = client_at([127, 0, 0, 2]);
    let statuses = ask_many(&first, &front, PER_MINUTE + 10, "first").await;
    assert_eq!(count(&statuses, 200), PER_MINUTE, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 10, "{statuses:?}");
    let (served_a, served_b) = (answered(&replica_a).await, answered(&replica_b).await);
    assert!(
        served_a > 0 && served_b > 0,
        "nginx spread the conversations over both replicas: {served_a} and {served_b}"
    );
    // Another client is unaffected.
    let second = client_at([127, 0, 0, 3]);
    assert_eq!(ask(&second, &front, &[]).await, 200);

    // Redis dies: no 5xx, the replicas count locally meanwhile.
    redis.0.kill().unwrap();
    redis.0.wait().unwrap();
    let third = client_at([127, 0, 0, 4]);
    let statuses = ask_many(&third, &front, 10, "third").await;
    assert!(statuses.iter().all(|&s| s < 500), "{statuses:?}");
    assert!(answered(&replica_a).await + answered(&replica_b).await > served_a + served_b);
    let failures = redis_failures(&[&replica_a, &replica_b]).await;
    assert!(failures > 0, "the fallback shows in the metrics");

    // Redis returns (empty): shared limits resume once the replicas have reconnected.
    let _redis = start_redis(redis_port);
    let probe = client_at([127, 0, 0, 7]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = redis_failures(&[&replica_a, &replica_b]).await;
        for replica in [&replica_a, &replica_b] {
            ask(&probe, replica, &[]).await;
        }
        if redis_failures(&[&replica_a, &replica_b]).await == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas never used Redis again"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let fourth = client_at([127, 0, 0, 5]);
    let statuses = ask_many(&fourth, &front, PER_MINUTE + 5, "fourth").await;
    assert_eq!(count(&statuses, 200), PER_MINUTE, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 5, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limit = [("DUET_LIMITS_REQUESTS_PER_MINUTE", "3")];
    let (_trusting, trusting) =
        start_duet(&[limit[0], ("DUET_SERVER_TRUSTED_PROXIES", "127.0.0.1/32")]);
    let (_plain, plain) = start_duet(&limit);
    let xff = |who: &str| vec![("x-forwarded-for", who.to_string())];

    // From the trusted proxy (127.0.0.1), each forwarded address is a client of its own.
    let proxy = client_at([127, 0, 0, 1]);
    for _ in 0..3 {
        assert_eq!(ask(&proxy, &trusting, &xff("198.51.100.7")).await, 200);
    }
    assert_eq!(ask(&proxy, &trusting, &xff("198.51.100.7")).await, 429);
    assert_eq!(ask(&proxy, &trusting, &xff("198.51.100.8")).await, 200);

    // From anyone else the header is ignored: new forged addresses do not buy requests.
    let stranger = client_at([127, 0, 0, 9]);
    for i in 0..3 {
        let forged = format!("203.0.113.{i}");
        assert_eq!(ask(&stranger, &trusting, &xff(&forged)).await, 200);
    }
    assert_eq!(ask(&stranger, &trusting, &xff("203.0.113.99")).await, 429);

    // Without trusted proxies nobody's header counts, the loopback's included.
    for i in 0..3 {
        let forged = format!("192.0.2.{i}");
        assert_eq!(ask(&proxy, &plain, &xff(&forged)).await, 200);
    }
    assert_eq!(ask(&proxy, &plain, &xff("192.0.2.99")).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_falls_back_or_refuses_as_configured() {
    // Nothing listens on this port.
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let shared = [
        ("DUET_LIMITS_BACKEND", "redis"),
        ("DUET_LIMITS_REDIS_URL", url.as_str()),
        ("DUET_LIMITS_REQUESTS_PER_MINUTE", "2"),
    ];
    let (_fallback, fallback) = start_duet(&shared);
    let client = client_at([127, 0, 0, 1]);
    let statuses = [
        ask(&client, &fallback, &[]).await,
        ask(&client, &fallback, &[]).await,
        ask(&client, &fallback, &[]).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "counted locally meanwhile");

    let mut refusing = shared.to_vec();
    refusing.push(("DUET_LIMITS_REDIS_FAILURE", "refuse"));
    let (_refuse, refuse) = start_duet(&refusing);
    let started = Instant::now();
    let response = client
        .post(format!("{refuse}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "x", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no hang on a dead Redis"
    );
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limits_unavailable", "{body}");
    assert!(
        !body.to_string().contains("redis://"),
        "no URL in errors: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_while_still_serving() {
    let (guard, base) = start_duet(&[("DUET_SERVER_DRAIN_MS", "3000")]);
    let client = client_at([127, 0, 0, 1]);
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    // SAFETY: a plain signal to the child this test started.
    assert_eq!(unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "draining: out of rotation");
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "but alive");
    assert_eq!(ask(&client, &base, &[]).await, 200, "and still answering");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_are_shared_and_a_refusal_reports_both_kinds() {
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let url = format!("redis://127.0.0.1:{redis_port}/");
    let env = [
        ("DUET_LIMITS_BACKEND", "redis"),
        ("DUET_LIMITS_REDIS_URL", url.as_str()),
        ("DUET_LIMITS_REQUESTS_PER_MINUTE", "20"),
        ("DUET_LIMITS_TOKENS_PER_MINUTE", "3"),
    ];
    let (_a, replica_a) = start_duet(&env);
    let (_b, replica_b) = start_duet(&env);
    let client = client_at([127, 0, 0, 2]);
    // One generated token each (max_tokens 1): the token taken when the request is admitted.
    let mut last = None;
    let mut statuses = Vec::new();
    for replica in [&replica_a, &replica_b, &replica_a, &replica_b] {
        let response = send(&client, replica, &[]).await;
        statuses.push(response.status().as_u16());
        last = Some(response);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let refused = last.unwrap();
    let header = |name: &str| refused.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("x-ratelimit-limit-tokens"), "3");
    assert_eq!(header("x-ratelimit-remaining-tokens"), "0");
    // The requests limit was not what refused: it reports what it had left.
    assert_eq!(header("x-ratelimit-limit-requests"), "20");
    assert_eq!(header("x-ratelimit-remaining-requests"), "16");
    let retry: u64 = header("retry-after").parse().unwrap();
    assert!((1..=21).contains(&retry), "{retry}");
}
