//! Settings with a syntax of their own, parsed once when the configuration loads: the
//! memory budget (`memory.max_bytes`) and the teacher's routes (`teacher.models`). Each
//! reads and writes the text the file and the environment hold, so the layering engine
//! sees strings and bad text fails the load with the key named.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::memory::number_and_unit;

/// `memory.max_bytes`: a size, or a share of the memory available when duet starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MemoryBudget {
    /// A size in bytes (more than zero).
    Bytes(u64),
    /// A percentage, above 0 and at most 100, of the available memory.
    ShareOfAvailable(f64),
}

impl MemoryBudget {
    /// The budget in bytes, given the memory available to duet (`memory::available_bytes`).
    pub fn resolve(&self, available: u64) -> u64 {
        match *self {
            Self::Bytes(bytes) => bytes,
            Self::ShareOfAvailable(percent) => (available as f64 * percent / 100.0) as u64,
        }
    }
}

/// A share of available memory (`50%`), a size with a unit (`512MiB`, `2GB`, `1.5G`), or
/// plain bytes.
impl FromStr for MemoryBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(percent) = t.strip_suffix('%') {
            let p: f64 = percent
                .trim()
                .parse()
                .map_err(|_| format!("`{text}` is not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("`{text}` must be between 0% and 100%"));
            }
            return Ok(Self::ShareOfAvailable(p));
        }
        let (n, unit) = number_and_unit(t)
            .ok_or_else(|| format!("`{text}` is not a size such as 2GiB, 512MB or 50%"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}` (use B, KB, KiB, MB, MiB, GB, GiB or %)"
                ));
            }
        };
        let bytes = (n * scale as f64) as u64;
        if bytes == 0 {
            return Err(format!("`{text}` leaves no memory at all"));
        }
        Ok(Self::Bytes(bytes))
    }
}

impl TryFrom<String> for MemoryBudget {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

/// Plain bytes or a percentage: text that parses back to the same budget.
impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(bytes) => write!(f, "{bytes}"),
            Self::ShareOfAvailable(percent) => write!(f, "{percent}%"),
        }
    }
}

impl From<MemoryBudget> for String {
    fn from(budget: MemoryBudget) -> Self {
        budget.to_string()
    }
}

/// One `teacher.models` entry: the model name clients send, and the name asked upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TeacherRoute {
    pub name: String,
    pub upstream: String,
}

impl TeacherRoute {
    pub fn new(name: impl Into<String>, upstream: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            upstream: upstream.into(),
        }
    }
}

/// `name` (the same name upstream) or `name=upstream-name`, spaces around either trimmed.
impl FromStr for TeacherRoute {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        let (name, upstream) = entry.split_once('=').unwrap_or((entry, entry));
        let (name, upstream) = (name.trim(), upstream.trim());
        if name.is_empty() || upstream.is_empty() {
            return Err(format!("`{entry}` is not `name` or `name=upstream-name`"));
        }
        Ok(Self::new(name, upstream))
    }
}

impl TryFrom<String> for TeacherRoute {
    type Error = String;

    fn try_from(entry: String) -> Result<Self, String> {
        entry.parse()
    }
}

impl fmt::Display for TeacherRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name == self.upstream {
            f.write_str(&self.name)
        } else {
            write!(f, "{}={}", self.name, self.upstream)
        }
    }
}

impl From<TeacherRoute> for String {
    fn from(route: TeacherRoute) -> Self {
        route.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::testing::{env, existing_model};
    use crate::config::{Config, Mode, load};
    use crate::memory::KeepAlive;

    fn budget(text: &str, available: u64) -> Result<u64, String> {
        text.parse::<MemoryBudget>().map(|b| b.resolve(available))
    }

    #[test]
    fn budgets_parse_as_shares_sizes_and_bytes() {
        assert_eq!(budget("50%", 1000), Ok(500));
        assert_eq!(budget("2GiB", 0), Ok(2 << 30));
        assert_eq!(budget("1.5G", 0), Ok(1_500_000_000));
        assert_eq!(budget("512 MiB", 0), Ok(512 << 20));
        assert_eq!(budget("123456", 0), Ok(123456));
        assert!(budget("150%", 1000).is_err());
        assert!(budget("lots", 1000).is_err());
        assert!(budget("2 parsecs", 1000).is_err());
        assert!(budget("0", 1000).is_err());
    }

    #[test]
    fn routes_are_a_name_or_a_name_and_its_upstream() {
        let fast: TeacherRoute = " fast = small-v2 ".parse().unwrap();
        assert_eq!(fast, TeacherRoute::new("fast", "small-v2"));
        assert_eq!(fast.to_string(), "fast=small-v2");
        let other: TeacherRoute = "other".parse().unwrap();
        assert_eq!(other, TeacherRoute::new("other", "other"));
        assert_eq!(other.to_string(), "other");
        for bad in ["", " ", "=x", "x=", " = "] {
            assert!(bad.parse::<TeacherRoute>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn typed_values_write_text_that_reads_back_the_same() {
        let mut config = Config::default();
        config.memory.max_bytes = "1.5G".parse().unwrap();
        config.memory.keep_alive = KeepAlive::For(Duration::from_millis(2500));
        config.teacher.models = vec!["fast=small".parse().unwrap(), "big".parse().unwrap()];
        config.server.api_keys = vec!["k1".into()];
        let table = toml::Table::try_from(config.clone()).unwrap();
        assert_eq!(table["memory"]["max_bytes"].as_str(), Some("1500000000"));
        assert_eq!(table["memory"]["keep_alive"].as_str(), Some("2.5s"));
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        assert_eq!(defaults["memory"]["max_bytes"].as_str(), Some("50%"));
        assert_eq!(defaults["memory"]["keep_alive"].as_str(), Some("5m"));
        // Client keys are written as stars: a printed configuration never shows one.
        assert_eq!(table["server"]["api_keys"][0].as_str(), Some("***"));
        let back: Config = toml::Value::Table(table).try_into().unwrap();
        config.server.api_keys = vec!["***".into()];
        assert_eq!(back, config);
    }

    #[test]
    fn typed_values_load_from_the_environment_or_name_their_key() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &model),
                ("DUET_MEMORY_MAX_BYTES", "400MiB"),
                ("DUET_MEMORY_KEEP_ALIVE", "-1"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.memory.max_bytes, MemoryBudget::Bytes(400 << 20));
        assert_eq!(c.memory.keep_alive, KeepAlive::Never);
        let c = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &model),
                ("DUET_MEMORY_KEEP_ALIVE", "0"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.memory.keep_alive, KeepAlive::For(Duration::ZERO));
        for (var, value, expected) in [
            (
                "DUET_MEMORY_MAX_BYTES",
                "lots",
                "memory.max_bytes: `lots` is not a size such as 2GiB, 512MB or 50%",
            ),
            (
                "DUET_MEMORY_MAX_BYTES",
                "150%",
                "memory.max_bytes: `150%` must be between 0% and 100%",
            ),
            (
                "DUET_MEMORY_KEEP_ALIVE",
                "soon",
                "memory.keep_alive: `soon` is not a duration such as 5m, 30s or -1",
            ),
            (
                "DUET_TEACHER_MODELS",
                "fast=small, =x",
                "teacher.models[1]: `=x` is not `name` or `name=upstream-name`",
            ),
        ] {
            let err = load(None, env(&[("DUET_MODE", "teacher"), (var, value)]), &[])
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("configuration: {expected}"), "{var}");
        }
        let c = load(
            None,
            env(&[
                ("DUET_MODE", "teacher"),
                ("DUET_TEACHER_MODELS", "fast=small, big"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Teacher);
        assert_eq!(
            c.teacher.models,
            vec![
                TeacherRoute::new("fast", "small"),
                TeacherRoute::new("big", "big")
            ]
        );
    }
}
