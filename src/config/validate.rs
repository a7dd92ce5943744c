//! The checks `load` runs once the layers are merged: values that must not be empty or
//! zero, settings that depend on each other, the model file, and the teacher's settings
//! when the mode uses it. Values with their own syntax were already typed by then.

use std::path::Path;

use super::{Config, ConfigError, LimitsBackend, Mode, ModelOr};

impl Config {
    /// Checks the merged settings; the first problem found is the error, naming its key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if let Err(why) =
            crate::http::client_address::TrustedProxies::parse(&self.server.trusted_proxies)
        {
            return bad("server.trusted_proxies", why);
        }
        if self.limits.backend == LimitsBackend::Redis {
            let url = self.limits.redis_url.expose();
            if url.trim().is_empty() {
                return bad(
                    "limits.redis_url",
                    "must name the Redis server when limits.backend is \"redis\" \
                     (e.g. redis://127.0.0.1:6379/)"
                        .into(),
                );
            }
            if let Err(e) = redis::Client::open(url) {
                // The error describes the URL's form, never its password.
                return bad("limits.redis_url", format!("is not a Redis URL: {e}"));
            }
        }
        if self.limits.redis_timeout_ms == 0 {
            return bad(
                "limits.redis_timeout_ms",
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
        let sampling = &self.student.sampling;
        for (key, value, low, high) in [
            (
                "student.sampling.temperature",
                sampling.temperature,
                0.0,
                2.0,
            ),
            (
                "student.sampling.top_p",
                sampling.top_p,
                f32::MIN_POSITIVE,
                1.0,
            ),
            ("student.sampling.min_p", sampling.min_p, 0.0, 1.0),
        ] {
            if let ModelOr::Value(v) = value
                && !(low..=high).contains(&v)
            {
                return bad(key, format!("{v} is outside {low}..={high}"));
            }
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
        let checkpoint = crate::student::checkpoint::is_checkpoint(model);
        // Teacher mode never loads weights, so it needs no model file.
        if self.mode != Mode::Teacher
            && !Path::new(model).exists()
            && crate::student::load::fetch::hub_reference(model).is_none()
            && !checkpoint
        {
            return bad(
                "student.model",
                format!(
                    "`{model}` is neither a file, a transformers checkpoint directory, a Hugging Face \
                     owner/repo/file.gguf nor an owner/repo id (scripts/fetch-models.sh fetches the default models)"
                ),
            );
        }
        let lora = self.student.lora_dir.as_str();
        if self.mode != Mode::Teacher && !lora.is_empty() {
            if !checkpoint {
                return bad(
                    "student.lora_dir (STUDENT_LORA_DIR)",
                    format!(
                        "a LoRA adapter is merged into a transformers checkpoint while it is quantized; \
                         `{model}` is a GGUF, whose weights are already quantized: point student.model at \
                         the adapter's base checkpoint"
                    ),
                );
            }
            let config = Path::new(lora).join("adapter_config.json");
            if !config.is_file() {
                return bad(
                    "student.lora_dir (STUDENT_LORA_DIR)",
                    format!("{} does not exist", config.display()),
                );
            }
        }
        if self.mode != Mode::Student {
            self.validate_teacher()?;
        }
        Ok(())
    }

    /// The teacher's settings, checked when a mode uses the teacher.
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
        if t.api_key_env.trim().is_empty() {
            return bad(
                "teacher.api_key_env",
                "must name an environment variable".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{env, existing_model};
    use crate::config::{Secret, load};

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
        let keys = load(None, env(&with_keys), &[]).unwrap().server.api_keys;
        assert_eq!(
            keys.iter().map(Secret::expose).collect::<Vec<_>>(),
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
