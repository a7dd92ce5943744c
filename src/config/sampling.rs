//! `[student.sampling]`: the sampling a request gets for the fields it leaves out. Each
//! setting is `"model"` (the model's recommendation from its GGUF, else llama.cpp's default)
//! or a value that wins over both.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::SamplingDefaults;

/// The sampling defaults the server applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub temperature: ModelOr<f32>,
    pub top_k: ModelOr<usize>,
    pub top_p: ModelOr<f32>,
    pub min_p: ModelOr<f32>,
}

impl SamplingConfig {
    /// `model`'s defaults with these settings over them.
    pub fn over(&self, model: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(model.temperature),
            top_k: self.top_k.or(model.top_k),
            top_p: self.top_p.or(model.top_p),
            min_p: self.min_p.or(model.min_p),
        }
    }
}

/// `"model"`, or a value chosen in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum ModelOr<T> {
    #[default]
    Model,
    Value(T),
}

impl<T: Copy> ModelOr<T> {
    pub fn or(self, model: T) -> T {
        match self {
            Self::Model => model,
            Self::Value(v) => v,
        }
    }
}

impl<T: FromStr> FromStr for ModelOr<T> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "model" => Ok(Self::Model),
            t => t
                .parse()
                .map(Self::Value)
                .map_err(|_| format!("`{text}` is not a number or \"model\"")),
        }
    }
}

impl<T: fmt::Display> fmt::Display for ModelOr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model => f.write_str("model"),
            Self::Value(v) => v.fmt(f),
        }
    }
}

/// Written as text (`"model"`, `"0.7"`), so the environment sets it like any string.
impl<T: fmt::Display> Serialize for ModelOr<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Read from text or, in a TOML file, a plain number (`temperature = 0.7`).
impl<'de, T: FromStr> Deserialize<'de> for ModelOr<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use crate::config::testing::{env, existing_model};

    #[test]
    fn settings_win_over_the_models_defaults_and_model_keeps_them() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &model),
                ("DUET_STUDENT_SAMPLING_TEMPERATURE", "0.2"),
                ("DUET_STUDENT_SAMPLING_TOP_K", "model"),
            ]),
            &[],
        )
        .unwrap();
        let resolved = c.student.sampling.over(SamplingDefaults::default());
        assert_eq!(resolved.temperature, 0.2);
        assert_eq!(resolved.top_k, 40, "llama.cpp's, the model giving none");
        let file: SamplingConfig = toml::from_str("top_k = 20\nmin_p = 0.1").unwrap();
        assert_eq!(file.top_k, ModelOr::Value(20));
        assert_eq!(file.min_p, ModelOr::Value(0.1));
        assert_eq!(file.temperature, ModelOr::Model);
        let bad = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &model),
                ("DUET_STUDENT_SAMPLING_TOP_P", "high"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("student.sampling.top_p"), "{bad}");
        let out_of_range = load(
            None,
            env(&[
                ("DUET_STUDENT_MODEL", &model),
                ("DUET_STUDENT_SAMPLING_TEMPERATURE", "5"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            out_of_range.contains("student.sampling.temperature"),
            "{out_of_range}"
        );
    }
}
