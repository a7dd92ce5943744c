//! duet's settings: built-in defaults, then a TOML file, then the environment (`.env`
//! included), then the command line, each overriding the one before, validated once into
//! [`Config`]. Unknown keys and impossible values stop start-up with a message naming them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

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
    pub max_bytes: String,
    /// How long the student stays loaded after its last request: `5m`, `30s`, `1h`;
    /// `0` unloads after each request; `-1` never unloads. Requests may set their own.
    pub keep_alive: String,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_bytes: "50%".into(),
            keep_alive: "5m".into(),
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

/// `teacher.policy`: who answers requests for the student's model name in hybrid mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The student, unless it is busy beyond its queue, failed to load, or the request
    /// needs what it cannot do (tools, logprobs, ...): then the teacher.
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
    pub models: Vec<String>,
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
    /// Keys clients must send as `Authorization: Bearer <key>` (none: no check).
    pub api_keys: Vec<String>,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// A GGUF file path, or a Hugging Face `owner/repo/file.gguf` fetched on first use.
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
        }
    }
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            model: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            name: String::new(),
            max_new_tokens: 512,
            context_length: 4096,
            queue_size: 64,
            parallel: 4,
            threads: 0,
        }
    }
}

/// A start-up error about configuration; always names the key or variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The Python app's environment variables and what duet makes of them.
fn legacy_variable(name: &str, value: &str) -> Result<Option<(&'static str, String)>, ConfigError> {
    let on = |v: &str| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    };
    Ok(match name {
        "STUDENT_BASE_MODEL" => Some(("student.model", value.to_string())),
        "TEACHER_BASE_URL" => Some(("teacher.base_url", value.to_string())),
        "TEACHER_MODEL" => Some(("teacher.model", value.to_string())),
        "STUDENT_MAX_NEW_TOKENS" => Some(("student.max_new_tokens", value.to_string())),
        // duet runs the student on the CPU; both values are accepted.
        "STUDENT_FORCE_CPU" => {
            if !on(value) {
                tracing::info!(
                    "STUDENT_FORCE_CPU=0: duet has no GPU backend, the student runs on the CPU"
                );
            }
            None
        }
        "STUDENT_LOAD_IN_4BIT" if on(value) => None, // GGUF weights stay quantized in memory
        "STUDENT_LOAD_IN_4BIT" => {
            return Err(ConfigError(
                "STUDENT_LOAD_IN_4BIT=0 cannot be honoured: duet keeps weights in the GGUF file's own \
                 format; for higher precision point student.model at a Q8_0 or F16 GGUF and unset it"
                    .into(),
            ));
        }
        // The Python app's hybrid switch: on means both backends, off means teacher only.
        "ENABLE_HYBRID" if on(value) => Some(("mode", "hybrid".into())),
        "ENABLE_HYBRID" => Some(("mode", "teacher".into())),
        "FORCE_STUDENT_STUB" if !on(value) => None,
        "FORCE_STUDENT_STUB" => {
            return Err(ConfigError(
                "FORCE_STUDENT_STUB=1 is refused: duet has no stub mode, every answer comes from the real model".into(),
            ));
        }
        "STUDENT_LORA_DIR" if value.trim().is_empty() => None,
        "STUDENT_LORA_DIR" => {
            return Err(ConfigError(
                "STUDENT_LORA_DIR is refused: duet does not apply LoRA adapters at run time; merge the adapter \
                 into the model and convert it to GGUF"
                    .into(),
            ));
        }
        _ => None,
    })
}

/// Builds the configuration from its four layers.
/// `env` is the process environment (after `.env` was read); `cli` holds dotted keys.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    cli: &[(&str, String)],
) -> Result<Config, ConfigError> {
    let defaults = Table::try_from(Config::default()).expect("defaults serialize");
    let mut merged = defaults.clone();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let table: Table =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        merge(&mut merged, table, &defaults, "")?;
    }
    let mut legacy = Vec::new();
    let mut duet = Vec::new();
    for (name, value) in env {
        if let Some(rest) = name.strip_prefix("DUET_") {
            if rest != "CONFIG" {
                duet.push((
                    name.clone(),
                    env_key(rest, &defaults).ok_or_else(|| {
                        ConfigError(format!("unknown setting in environment variable {name}"))
                    })?,
                    value,
                ));
            }
        } else if let Some((key, value)) = legacy_variable(&name, &value)? {
            legacy.push((name, key.to_string(), value));
        }
    }
    // Legacy names first so that a DUET_ variable for the same setting wins.
    for (var, key, value) in legacy.into_iter().chain(duet) {
        set(&mut merged, &defaults, &key, &value, &var)?;
    }
    for (key, value) in cli {
        set(
            &mut merged,
            &defaults,
            key,
            value,
            &format!("--{}", key.rsplit('.').next().unwrap_or(key)),
        )?;
    }
    // serde_path_to_error names the setting a type error is about (`teacher.policy`).
    let config: Config = serde_path_to_error::deserialize(Value::Table(merged))
        .map_err(|e| ConfigError(format!("{}: {}", e.path(), e.inner().message())))?;
    config.validate()?;
    Ok(config)
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        if self.server.host.trim().is_empty() {
            return bad("server.host", "must not be empty".into());
        }
        let loopback = match self.server.host.as_str() {
            "localhost" => true,
            host => host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
        };
        if !loopback
            && self.server.api_keys.is_empty()
            && self.server.api_keys_file.is_empty()
            && !self.server.allow_unauthenticated
        {
            return bad(
                "server.host",
                format!(
                    "{} is reachable from other machines and no API keys are set: set server.api_keys \
                     (or server.api_keys_file), or pass --allow-unauthenticated to serve everyone",
                    self.server.host
                ),
            );
        }
        if self.server.read_timeout_ms == 0 {
            return bad(
                "server.read_timeout_ms",
                "must be at least 1 millisecond".into(),
            );
        }
        if self.limits.max_messages == 0 {
            return bad("limits.max_messages", "must be at least 1".into());
        }
        if self.server.max_body_bytes < 1024 {
            return bad(
                "server.max_body_bytes",
                format!(
                    "{} is too small to hold a chat request (minimum 1024)",
                    self.server.max_body_bytes
                ),
            );
        }
        if self.student.max_new_tokens == 0 {
            return bad("student.max_new_tokens", "must be at least 1".into());
        }
        if self.student.context_length < 16 {
            return bad(
                "student.context_length",
                format!("{} is too small (minimum 16)", self.student.context_length),
            );
        }
        if self.student.queue_size == 0 {
            return bad("student.queue_size", "must be at least 1".into());
        }
        if self.student.parallel == 0 {
            return bad("student.parallel", "must be at least 1".into());
        }
        if self.student.max_new_tokens >= self.student.context_length {
            return bad(
                "student.max_new_tokens",
                format!(
                    "{} leaves no room for a prompt in student.context_length {}",
                    self.student.max_new_tokens, self.student.context_length
                ),
            );
        }
        let model = &self.student.model;
        // Teacher mode never loads weights, so it needs no model file.
        if self.mode != Mode::Teacher
            && !Path::new(model).exists()
            && crate::student::source::hub_reference(model).is_none()
        {
            return bad(
                "student.model",
                format!(
                    "`{model}` is neither a file nor a Hugging Face owner/repo/file.gguf (scripts/fetch-models.sh fetches the default models)"
                ),
            );
        }
        if self.mode != Mode::Student {
            self.validate_teacher()?;
        }
        if let Err(why) =
            crate::memory::parse_budget(&self.memory.max_bytes, crate::memory::available_bytes())
        {
            return bad("memory.max_bytes", why);
        }
        if let Err(why) = crate::memory::KeepAlive::parse(&self.memory.keep_alive) {
            return bad("memory.keep_alive", why);
        }
        Ok(())
    }

    fn validate_teacher(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        let t = &self.teacher;
        let url = t.base_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return bad(
                "teacher.base_url",
                format!(
                    "`{}` is not an http(s) URL such as https://api.openai.com/v1",
                    t.base_url
                ),
            );
        }
        for (key, ms) in [
            ("teacher.connect_timeout_ms", t.connect_timeout_ms),
            ("teacher.first_byte_timeout_ms", t.first_byte_timeout_ms),
            ("teacher.chunk_timeout_ms", t.chunk_timeout_ms),
        ] {
            if ms == 0 {
                return bad(key, "must be at least 1 millisecond".into());
            }
        }
        if t.model.trim().is_empty() {
            return bad("teacher.model", "must name the upstream model".into());
        }
        for entry in &t.models {
            let (name, upstream) = entry.split_once('=').unwrap_or((entry, entry));
            if name.trim().is_empty() || upstream.trim().is_empty() {
                return bad(
                    "teacher.models",
                    format!("`{entry}` is not `name` or `name=upstream-name`"),
                );
            }
        }
        if t.api_key_env.trim().is_empty() {
            return bad(
                "teacher.api_key_env",
                "must name an environment variable".into(),
            );
        }
        Ok(())
    }

    /// The model id clients use for the student.
    pub fn student_name(&self) -> String {
        if !self.student.name.is_empty() {
            return self.student.name.clone();
        }
        let file = self
            .student
            .model
            .rsplit('/')
            .next()
            .unwrap_or(&self.student.model);
        file.strip_suffix(".gguf").unwrap_or(file).to_string()
    }

    /// The config file named by `DUET_CONFIG`, when the command line names none.
    pub fn file_from_env() -> Option<PathBuf> {
        std::env::var_os("DUET_CONFIG").map(PathBuf::from)
    }
}

/// `SERVER_MAX_BODY_BYTES` -> `server.max_body_bytes`, when such a setting exists.
fn env_key(rest: &str, defaults: &Table) -> Option<String> {
    let lower = rest.to_ascii_lowercase();
    if let Some((section, key)) = lower.split_once('_')
        && defaults
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|t| t.contains_key(key))
    {
        return Some(format!("{section}.{key}"));
    }
    defaults
        .get(&lower)
        .filter(|v| !v.is_table())
        .map(|_| lower)
}

/// Sets a dotted key from a string, typed after the default value of that key.
fn set(
    table: &mut Table,
    defaults: &Table,
    key: &str,
    raw: &str,
    source: &str,
) -> Result<(), ConfigError> {
    let (section, name) = key.split_once('.').unwrap_or(("", key));
    let default = if section.is_empty() {
        defaults.get(name)
    } else {
        defaults.get(section).and_then(|s| s.get(name))
    };
    let default =
        default.ok_or_else(|| ConfigError(format!("{source}: unknown setting `{key}`")))?;
    let value = match default {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| {
            ConfigError(format!(
                "{source}: `{key}` must be a whole number, not `{raw}`"
            ))
        })?),
        Value::Boolean(_) => Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => {
                return Err(ConfigError(format!(
                    "{source}: `{key}` must be true or false, not `{raw}`"
                )));
            }
        }),
        Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| {
            ConfigError(format!("{source}: `{key}` must be a number, not `{raw}`"))
        })?),
        // Lists are comma-separated in the environment and on the command line.
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => {
            return Err(ConfigError(format!(
                "{source}: `{key}` cannot be set from text"
            )));
        }
    };
    let target = if section.is_empty() {
        table
    } else {
        table
            .get_mut(section)
            .and_then(Value::as_table_mut)
            .expect("sections exist in defaults")
    };
    target.insert(name.to_string(), value);
    Ok(())
}

/// Overlays `layer` on `base`, refusing keys the defaults do not have.
fn merge(
    base: &mut Table,
    layer: Table,
    defaults: &Table,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (key, value) in layer {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(default) = defaults.get(&key) else {
            return Err(ConfigError(format!("unknown setting `{path}`")));
        };
        match (value, default) {
            (Value::Table(inner), Value::Table(default_inner)) => {
                let slot = base
                    .get_mut(&key)
                    .and_then(Value::as_table_mut)
                    .expect("sections exist in defaults");
                merge(slot, inner, default_inner, &path)?;
            }
            (value, _) => {
                base.insert(key, value);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn repo_file(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// A model path that exists, so validation passes in every test.
    fn existing_model() -> String {
        repo_file("Cargo.toml").display().to_string()
    }

    #[test]
    fn shipped_default_toml_matches_the_built_in_defaults() {
        let text = std::fs::read_to_string(repo_file("config/default.toml")).unwrap();
        let from_file: Config = toml::from_str(&text).unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn command_line_beats_environment_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("duet.toml");
        std::fs::write(&file, format!("[server]\nport = 7000\nhost = \"127.0.0.2\"\n[student]\nmodel = {:?}\nmax_new_tokens = 10\n", existing_model())).unwrap();
        let c = load(
            Some(&file),
            env(&[
                ("DUET_SERVER_PORT", "9000"),
                ("STUDENT_MAX_NEW_TOKENS", "20"),
            ]),
            &[("server.host", "::1".into())],
        )
        .unwrap();
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.host, "::1");
        assert_eq!(c.student.max_new_tokens, 20);
        let c = load(
            Some(&file),
            env(&[("DUET_SERVER_PORT", "9000")]),
            &[("server.port", "9100".into())],
        )
        .unwrap();
        assert_eq!(c.server.port, 9100);
    }

    #[test]
    fn duet_variables_win_over_the_python_apps_names() {
        let c = load(
            None,
            env(&[
                ("STUDENT_MAX_NEW_TOKENS", "20"),
                ("DUET_STUDENT_MAX_NEW_TOKENS", "30"),
                ("DUET_STUDENT_MODEL", &existing_model()),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.student.max_new_tokens, 30);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("duet.toml");
        std::fs::write(&file, "[server]\nprot = 1\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("server.prot"), "{err}");
        let err = load(None, env(&[("DUET_SERVER_PROT", "1")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("DUET_SERVER_PROT"), "{err}");
        let err = load(None, env(&[("DUET_SERVER_PORT", "eighty")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.port"), "{err}");
        let err = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &existing_model()),
                ("DUET_STUDENT_CONTEXT_LENGTH", "4"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("student.context_length"), "{err}");
        let err = load(None, env(&[("DUET_STUDENT_MODEL", "no/such.gguf")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("student.model"), "{err}");
    }

    #[test]
    fn python_app_variables_are_honoured_or_refused_with_a_reason() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("STUDENT_BASE_MODEL", &model),
                ("STUDENT_FORCE_CPU", "1"),
                ("STUDENT_LOAD_IN_4BIT", "1"),
                ("FORCE_STUDENT_STUB", "0"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.student.model, model);
        for (var, value) in [
            ("STUDENT_LOAD_IN_4BIT", "0"),
            ("FORCE_STUDENT_STUB", "1"),
            ("STUDENT_LORA_DIR", "/adapters"),
        ] {
            let err = load(
                None,
                env(&[(var, value), ("STUDENT_BASE_MODEL", &model)]),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn the_model_name_defaults_to_the_file_name() {
        let mut c = Config::default();
        assert_eq!(c.student_name(), "SmolLM2-135M-Instruct.Q4_1");
        c.student.name = "smol".into();
        assert_eq!(c.student_name(), "smol");
    }

    #[test]
    fn teacher_settings_and_the_hybrid_switch() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("ENABLE_HYBRID", "0"),
                ("TEACHER_BASE_URL", "http://127.0.0.1:9/v1"),
                ("TEACHER_MODEL", "big"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Teacher, "teacher mode needs no model file");
        assert_eq!(c.teacher.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(c.teacher.model, "big");
        let c = load(
            None,
            env(&[
                ("ENABLE_HYBRID", "1"),
                ("STUDENT_BASE_MODEL", &model),
                ("DUET_TEACHER_MODELS", "gpt-4o, fast=gpt-4o-mini"),
                ("DUET_TEACHER_POLICY", "teacher-first"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Hybrid);
        assert_eq!(c.teacher.models, vec!["gpt-4o", "fast=gpt-4o-mini"]);
        assert_eq!(c.teacher.policy, Policy::TeacherFirst);
        let c = load(
            None,
            env(&[
                ("DUET_MODE", "hybrid"),
                ("ENABLE_HYBRID", "0"),
                ("STUDENT_BASE_MODEL", &model),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Hybrid, "DUET_MODE wins over ENABLE_HYBRID");
        let err = load(
            None,
            env(&[
                ("DUET_MODE", "teacher"),
                ("DUET_TEACHER_BASE_URL", "ftp://x"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("teacher.base_url"), "{err}");
        let err = load(None, env(&[("DUET_MODE", "solo")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode") && err.contains("solo"), "{err}");
    }

    #[test]
    fn every_shipped_profile_loads() {
        let dir = repo_file("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                // Model paths in the profiles are relative to the repository root.
                let text = std::fs::read_to_string(&path).unwrap();
                let text = text.replace(
                    "\"models/",
                    &format!("\"{}/models/", env!("CARGO_MANIFEST_DIR")),
                );
                let file = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(file.path(), text).unwrap();
                load(Some(file.path()), env(&[]), &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert_eq!(seen, 5, "default plus the four memory profiles");
    }

    #[test]
    fn other_machines_need_keys_or_an_explicit_yes() {
        let model = existing_model();
        let base = [
            ("DUET_STUDENT_MODEL", model.as_str()),
            ("DUET_SERVER_HOST", "0.0.0.0"),
        ];
        let err = load(None, env(&base), &[]).unwrap_err().to_string();
        assert!(
            err.contains("server.host") && err.contains("--allow-unauthenticated"),
            "{err}"
        );
        let with_keys = [base[0], base[1], ("DUET_SERVER_API_KEYS", "k1,k2")];
        assert_eq!(
            load(None, env(&with_keys), &[]).unwrap().server.api_keys,
            vec!["k1", "k2"]
        );
        let allowed = load(
            None,
            env(&base),
            &[("server.allow_unauthenticated", "true".into())],
        );
        assert!(allowed.is_ok());
        assert!(
            load(
                None,
                env(&[base[0], ("DUET_SERVER_HOST", "localhost")]),
                &[]
            )
            .is_ok()
        );
    }
}
