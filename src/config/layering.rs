//! The layering engine: built-in defaults < TOML file < environment (`.env` included) <
//! command line, each overriding the one before. Keys are checked against the defaults'
//! table, and text from the environment or command line is typed after the default value.

use std::path::Path;

use toml::{Table, Value};

use super::legacy::legacy_variable;
use super::{Config, ConfigError};

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
            if rest != "CONFIG"
                && !(env_key(rest, &defaults).is_none() && is_service_link(rest, &value))
            {
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
    // serde_path_to_error names the setting a type or parse error is about (`teacher.policy`,
    // `memory.max_bytes`, `teacher.models[1]`).
    let config: Config = serde_path_to_error::deserialize(Value::Table(merged))
        .map_err(|e| ConfigError(format!("{}: {}", e.path(), e.inner().message())))?;
    config.validate()?;
    Ok(config)
}

/// Whether `DUET_<rest>=value` is a variable Kubernetes sets for a Service whose name starts
/// with `duet` (`DUET_SERVICE_HOST=10.0.0.7`, `DUET_PORT_8080_TCP=tcp://10.0.0.7:8080`,
/// `DUET_REDIS_SERVICE_PORT=6379`, ...): not a setting, and no reason to stop a pod that did
/// not turn service links off. Name and value must both fit, so a mistyped setting is still
/// an error.
fn is_service_link(rest: &str, value: &str) -> bool {
    let parts: Vec<&str> = rest.split('_').collect();
    let is_address = value.parse::<std::net::IpAddr>().is_ok();
    let is_port = value.parse::<u16>().is_ok();
    let is_url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|scheme| value.starts_with(scheme));
    if let Some(at) = parts.windows(2).position(|w| w[0] == "SERVICE") {
        return match parts[at + 1] {
            "HOST" => at + 2 == parts.len() && is_address,
            "PORT" => is_port,
            _ => false,
        };
    }
    let Some(at) = parts.iter().position(|&p| p == "PORT") else {
        return false;
    };
    match &parts[at + 1..] {
        [] => is_url,
        [number, protocol, last @ ..] if number.parse::<u16>().is_ok() => {
            matches!(*protocol, "TCP" | "UDP" | "SCTP")
                && match last {
                    [] => is_url,
                    ["PROTO"] => matches!(value, "tcp" | "udp" | "sctp"),
                    ["PORT"] => is_port,
                    ["ADDR"] => is_address,
                    _ => false,
                }
        }
        _ => false,
    }
}

/// `SERVER_MAX_BODY_BYTES` -> `server.max_body_bytes` (and `STUDENT_SAMPLING_TOP_K` ->
/// `student.sampling.top_k`), when such a setting exists.
fn env_key(rest: &str, defaults: &Table) -> Option<String> {
    /// The dotted path whose keys, joined by `_`, spell `name` in `table`.
    fn find(table: &Table, name: &str) -> Option<String> {
        table.iter().find_map(|(key, value)| match value {
            Value::Table(inner) => name
                .strip_prefix(key.as_str())
                .and_then(|rest| rest.strip_prefix('_'))
                .and_then(|rest| find(inner, rest))
                .map(|path| format!("{key}.{path}")),
            _ => (name == key).then(|| key.clone()),
        })
    }
    find(defaults, &rest.to_ascii_lowercase())
}

/// Sets a dotted key from a string, typed after the default value of that key.
fn set(
    table: &mut Table,
    defaults: &Table,
    key: &str,
    raw: &str,
    source: &str,
) -> Result<(), ConfigError> {
    let (sections, name) = key.rsplit_once('.').unwrap_or(("", key));
    let sections: Vec<&str> = sections.split('.').filter(|s| !s.is_empty()).collect();
    let default = sections
        .iter()
        .try_fold(defaults, |t, s| t.get(*s).and_then(Value::as_table))
        .and_then(|t| t.get(name))
        .filter(|v| !v.is_table());
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
    let target = sections.iter().fold(table, |t, s| {
        t.get_mut(*s)
            .and_then(Value::as_table_mut)
            .expect("sections exist in defaults")
    });
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
    use crate::config::testing::{env, existing_model, repo_file};

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
    fn kubernetes_service_links_are_not_settings() {
        // What a pod gets for Services named `duet` and `duet-redis` unless
        // enableServiceLinks is off.
        let links = [
            ("DUET_SERVICE_HOST", "10.0.0.7"),
            ("DUET_SERVICE_PORT", "8080"),
            ("DUET_SERVICE_PORT_HTTP", "8080"),
            ("DUET_PORT", "tcp://10.0.0.7:8080"),
            ("DUET_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
            ("DUET_PORT_8080_TCP_PROTO", "tcp"),
            ("DUET_PORT_8080_TCP_PORT", "8080"),
            ("DUET_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("DUET_REDIS_SERVICE_HOST", "10.0.0.8"),
            ("DUET_REDIS_PORT_6379_TCP_ADDR", "10.0.0.8"),
        ];
        let model = existing_model();
        let mut vars = links.to_vec();
        vars.push(("DUET_STUDENT_MODEL", &model));
        let c = load(None, env(&vars), &[]).unwrap();
        assert_eq!(c.server.port, 8080);
        // A real setting is still a setting, and a near miss still an error.
        for (typo, value) in [
            ("DUET_SERVER_PORTS", "1"),
            ("DUET_LIMITS_REDIS_PORT", "6379"),
        ] {
            let err = load(None, env(&[(typo, value)]), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(typo), "{err}");
        }
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
}
