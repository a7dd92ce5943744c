//! duet's settings: the [`Config`] struct, its sections and their built-in defaults.
//! Loading them (defaults < TOML file < environment, `.env` included < command line) is
//! in `layering`, the Python app's variables in `legacy`, the checks in `validate`; values
//! with a shape of their own (the byte budget, teacher routes, client keys) are typed once,
//! when the configuration loads, in `types` and `secret`.

mod layering;
mod legacy;
mod sampling;
mod secret;
mod types;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::memory::KeepAlive;
pub use layering::load;
pub use sampling::{ModelOr, SamplingConfig};
pub use secret::Secret;
pub use types::{MemoryBudget, TeacherRoute};

/// Every setting duet has. `config/default.toml` documents each one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Who answers: the local student, the upstream teacher, or both (hybrid).
    pub mode: Mode,
    pub server: ServerConfig,
    pub student: StudentConfig,
    pub teacher: TeacherConfig,
    pub memory: MemoryConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// The budget: a size (`2GiB`, `1500MB`, bytes) or a share of the memory available to
    /// duet when it starts (`50%`, the machine's or its cgroup's, whichever is lower).
    pub max_bytes: MemoryBudget,
    /// How long the student stays loaded after its last request: `5m`, `30s`, `1h`;
    /// `0` unloads after each request; `-1` never unloads. Requests may set their own.
    pub keep_alive: KeepAlive,
}

impl MemoryConfig {
    /// The budget in bytes, given the memory available to duet now.
    pub fn budget(&self) -> u64 {
        self.max_bytes.resolve(crate::memory::available_bytes())
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_bytes: MemoryBudget::ShareOfAvailable(50.0),
            keep_alive: KeepAlive::For(Duration::from_secs(5 * 60)),
        }
    }
}

/// Rate limits (0 turns one off; per client means per API key, else per address) and
/// input limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub global_requests_per_minute: u32,
    pub global_tokens_per_minute: u32,
    /// Most messages one request may hold.
    pub max_messages: usize,
    /// Cap on a request's max_tokens (0: only the context bounds it).
    pub max_tokens: usize,
    /// Over the cap: lower max_tokens to it (true) or refuse with 400 (false).
    pub clamp_max_tokens: bool,
    /// Where the per-minute limits are counted: this process, or Redis for all replicas.
    pub backend: LimitsBackend,
    /// The Redis server of the `redis` backend, e.g. `redis://127.0.0.1:6379/`.
    pub redis_url: Secret,
    /// What a request meets while Redis cannot be reached.
    pub redis_failure: RedisFailure,
    /// Longest wait for Redis on one request's check, in milliseconds.
    pub redis_timeout_ms: u64,
}

/// `limits.backend`: where the rate limits are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    /// In this process: each replica counts for itself.
    #[default]
    Local,
    /// In Redis, shared by every replica that uses the same server.
    Redis,
}

/// `limits.redis_failure`: the `redis` backend's answer while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Count in this process meanwhile (a warning and a metric say so).
    #[default]
    Local,
    /// Refuse limited requests with 503 until Redis is back.
    Refuse,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 0,
            tokens_per_minute: 0,
            global_requests_per_minute: 0,
            global_tokens_per_minute: 0,
            max_messages: 1024,
            max_tokens: 0,
            clamp_max_tokens: true,
            backend: LimitsBackend::Local,
            redis_url: Secret::default(),
            redis_failure: RedisFailure::Local,
            redis_timeout_ms: 250,
        }
    }
}

/// `mode`: which backends serve requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Local model only.
    #[default]
    Student,
    /// Everything upstream; no weights are ever loaded (the lowest-memory profile).
    Teacher,
    /// Both: by model name, and for the student's name by `teacher.policy`.
    Hybrid,
}

/// `student.kernels`: the instruction-set level of duet's own kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernels {
    /// The best level this CPU has.
    #[default]
    Auto,
    /// AVX-512 with VNNI (Intel since Ice Lake servers, AMD since Zen 4).
    Avx512,
    /// AVX2 with AVX-VNNI, FMA and F16C (Intel client CPUs since Alder Lake, AMD since Zen 4).
    AvxVnni,
    /// AVX2 with FMA and F16C (x86-64 CPUs since about 2013-2015).
    Avx2,
    /// No SIMD of duet's own: candle's kernels, on any CPU.
    Portable,
}

/// `student.quantization`: what a transformers checkpoint's matrices become while loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Quantization {
    /// 4-bit Q4_K, with Q6_K where llama.cpp's Q4_K_M keeps more bits (the output head,
    /// some value and down projections): the Python app's `STUDENT_LOAD_IN_4BIT=1`.
    #[default]
    #[serde(rename = "q4_k_m")]
    #[value(name = "q4_k_m")]
    Q4KM,
    /// 8-bit Q8_0, close to the float weights: the Python app's `STUDENT_LOAD_IN_4BIT=0`.
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quantization {
    /// The name settings and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4KM => "q4_k_m",
            Self::Q8_0 => "q8_0",
        }
    }
}

/// `teacher.policy`: who answers requests for the student's model name in hybrid mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The student, unless it is busy beyond its queue, failed to load, or the request
    /// needs what it cannot do (images, several choices, ...): then the teacher.
    #[default]
    StudentFirst,
    /// The teacher, unless it is unreachable, times out, or answers 5xx or 429: then the student.
    TeacherFirst,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    /// The upstream OpenAI-compatible API, up to and including `/v1`.
    pub base_url: String,
    /// Name of the environment variable that holds the upstream's API key (never the key).
    pub api_key_env: String,
    /// Upstream model used for requests that name the student's model and go upstream.
    pub model: String,
    /// More model names routed upstream, each `name` or `name=upstream-name`.
    pub models: Vec<TeacherRoute>,
    pub policy: Policy,
    /// Limit for opening the TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Limit from sending the request to the first byte of the answer (first event when streamed).
    pub first_byte_timeout_ms: u64,
    /// Limit between two chunks of a streamed answer.
    pub chunk_timeout_ms: u64,
    /// Extra attempts after a connection error, a timeout before the first byte, or a 5xx.
    pub retries: u32,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key_env: "TEACHER_API_KEY".into(),
            model: "gpt-4o-mini".into(),
            models: vec![],
            policy: Policy::StudentFirst,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 60_000,
            chunk_timeout_ms: 60_000,
            retries: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind; loopback by default so nothing outside this machine can connect.
    pub host: String,
    pub port: u16,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// HTTP worker threads (0: one per CPU core). Generation never runs on them.
    pub workers: usize,
    /// Keys clients must send as `Authorization: Bearer <key>` (none: no check). They
    /// print as `***`, so no `Debug` of the configuration shows them.
    pub api_keys: Vec<Secret>,
    /// A file with more keys, one per line.
    pub api_keys_file: String,
    /// Allows binding a non-loopback address without keys.
    pub allow_unauthenticated: bool,
    /// Origins allowed to call duet from a browser (CORS); empty: none, `*`: any.
    pub cors_origins: Vec<String>,
    /// Longest wait for the next piece of a request body (408 beyond).
    pub read_timeout_ms: u64,
    /// On SIGTERM or Ctrl-C, how long in-flight answers may take to finish.
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, how long duet goes on serving while `/ready` says 503, so that a load
    /// balancer stops sending before the listener closes.
    pub drain_ms: u64,
    /// Proxies (addresses or CIDRs) whose `X-Forwarded-For` / `Forwarded` name the client.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// A GGUF file path, a Hugging Face `owner/repo/file.gguf` fetched on first use, or a
    /// transformers checkpoint (a directory or an `owner/repo` id) quantized while loading.
    pub model: String,
    /// The model id clients send and `/v1/models` lists ("" = the file name without `.gguf`).
    pub name: String,
    /// Generated tokens when a request sets no `max_tokens`.
    pub max_new_tokens: usize,
    /// Longest sequence (prompt + completion) accepted; capped by what the model was trained for.
    pub context_length: usize,
    /// Requests that may wait for the model; more are answered 429 with Retry-After.
    pub queue_size: usize,
    /// Sequences generated together in one forward pass (continuous batching); requests
    /// beyond it wait in the queue.
    pub parallel: usize,
    /// CPU threads for the model's arithmetic; 0 = the physical cores. Read once per process.
    pub threads: usize,
    /// Which of duet's kernels run: the best this CPU has (`auto`), or one forced, for tests
    /// and benchmarks. Read once per process.
    pub kernels: Kernels,
    /// The type a transformers checkpoint's weights are quantized to while loading (a GGUF
    /// keeps its own).
    pub quantization: Quantization,
    /// A PEFT LoRA adapter merged into a transformers checkpoint's weights while loading
    /// ("" = none).
    pub lora_dir: String,
    /// Sampling for the fields a request leaves out.
    pub sampling: SamplingConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 4 * 1024 * 1024,
            workers: 0,
            api_keys: vec![],
            api_keys_file: String::new(),
            allow_unauthenticated: false,
            cors_origins: vec![],
            read_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            drain_ms: 0,
            trusted_proxies: vec![],
        }
    }
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            // The smallest model whose answers to everyday questions are mostly right
            // (tests/quality.rs); SmolLM2-135M is the smaller choice.
            model: "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into(),
            name: String::new(),
            max_new_tokens: 512,
            context_length: 4096,
            queue_size: 64,
            parallel: 4,
            threads: 0,
            kernels: Kernels::Auto,
            quantization: Quantization::Q4KM,
            lora_dir: String::new(),
            sampling: SamplingConfig::default(),
        }
    }
}

/// A start-up error about configuration; always names the key or variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The model id clients use for the student.
    pub fn student_name(&self) -> String {
        if !self.student.name.is_empty() {
            return self.student.name.clone();
        }
        // A checkpoint directory may be written with a trailing slash.
        let model = self.student.model.trim_end_matches('/');
        let file = model.rsplit('/').next().unwrap_or(model);
        file.strip_suffix(".gguf").unwrap_or(file).to_string()
    }

    /// The config file named by `DUET_CONFIG`, when the command line names none.
    pub fn file_from_env() -> Option<PathBuf> {
        std::env::var_os("DUET_CONFIG").map(PathBuf::from)
    }
}

/// What the tests of every configuration file share.
#[cfg(test)]
mod testing {
    use std::path::{Path, PathBuf};

    /// Environment variables as `load` takes them.
    pub fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn repo_file(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// A model path that exists, so validation passes in every test.
    pub fn existing_model() -> String {
        repo_file("Cargo.toml").display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{env, existing_model, repo_file};
    use super::*;

    #[test]
    fn shipped_default_toml_matches_the_built_in_defaults() {
        let text = std::fs::read_to_string(repo_file("config/default.toml")).unwrap();
        let from_file: Config = toml::from_str(&text).unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn the_model_name_defaults_to_the_file_name() {
        let mut c = Config::default();
        assert_eq!(c.student_name(), "qwen2.5-coder-0.5b-instruct-q4_k_m");
        c.student.model = "/models/Qwen1.5-1.8B-Chat/".into();
        assert_eq!(
            c.student_name(),
            "Qwen1.5-1.8B-Chat",
            "a checkpoint directory"
        );
        c.student.model = "Qwen/Qwen1.5-1.8B-Chat".into();
        assert_eq!(c.student_name(), "Qwen1.5-1.8B-Chat", "a hub repo id");
        c.student.name = "smol".into();
        assert_eq!(c.student_name(), "smol");
    }

    #[test]
    fn debug_output_never_shows_a_client_key() {
        let c = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &existing_model()),
                ("DUET_SERVER_API_KEYS", "sk-client-secret-123"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.server.api_keys[0].expose(), "sk-client-secret-123");
        for shown in [
            format!("{c:?}"),
            format!("{c:#?}"),
            format!("{:?}", c.server),
        ] {
            assert!(!shown.contains("sk-client-secret"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }
}
