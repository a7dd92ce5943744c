//! A checkpoint's `config.json`: which architecture it is (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`; anything else is refused by name) and its hyper-parameters.

use std::path::Path;

use serde::Deserialize;

use crate::error::DuetError;
use crate::student::model::Architecture;

/// The fields of `config.json` duet reads; the defaults are transformers' own for Llama and
/// Qwen2 configurations.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers before 5 writes `rope_theta` (and `rope_scaling`); from 5 on both live in
    /// `rope_parameters`.
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Where transformers says the weights came from (`Qwen/Qwen1.5-1.8B-Chat`).
    #[serde(default, rename = "_name_or_path", alias = "_model_name_or_path")]
    pub name_or_path: String,
    #[serde(skip)]
    pub architecture: Option<Architecture>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_context() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, DuetError> {
        let path = dir.join("config.json");
        let mut config: Self = super::read_json(&path)?;
        config.architecture = Some(
            config
                .check()
                .map_err(|why| DuetError::ModelLoad(format!("{}: {why}", path.display())))?,
        );
        Ok(config)
    }

    pub fn arch(&self) -> Architecture {
        self.architecture.expect("set when read")
    }

    /// The rotary base: `rope_theta`, or `rope_parameters.rope_theta`, else transformers'
    /// default.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The architecture, or why duet cannot run this checkpoint.
    fn check(&self) -> Result<Architecture, String> {
        let name = self
            .architectures
            .first()
            .map(String::as_str)
            .unwrap_or("(none)");
        let arch = match name {
            "LlamaForCausalLM" => Architecture::Llama,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => {
                return Err(format!(
                    "architecture `{other}` is not supported: duet runs LlamaForCausalLM and Qwen2ForCausalLM \
                     checkpoints (Llama, SmolLM, Qwen1.5, Qwen2, Qwen2.5)"
                ));
            }
        };
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(format!(
                "rope_scaling {scaling} is not supported: duet's rotary embedding is unscaled"
            ));
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type")?.as_str());
        if let Some(kind) = rope_type.filter(|t| *t != "default") {
            return Err(format!(
                "rope_parameters.rope_type `{kind}` is not supported: duet's rotary embedding is unscaled"
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(
                "llama checkpoints with attention_bias or mlp_bias are not supported".into(),
            );
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported: duet's feed-forward is SwiGLU (silu)",
                self.hidden_act
            ));
        }
        if self.use_sliding_window {
            return Err(
                "use_sliding_window is not supported: duet attends over the whole context".into(),
            );
        }
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, size)| *size == 0) {
            return Err(format!("{name} is 0"));
        }
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        let head_dim = self.head_dim();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) || head_dim == 0 || head_dim % 2 == 1
        {
            return Err(format!(
                "impossible attention shape: {heads} heads over {kv} key/value heads of {} values",
                self.head_dim()
            ));
        }
        Ok(arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<ModelConfig, DuetError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        ModelConfig::read(dir.path())
    }

    #[test]
    fn qwen_and_llama_are_read_others_refused_by_name() {
        let qwen = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 2048,
            "intermediate_size": 5504, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": 151936, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": false,
            "rope_scaling": null, "use_sliding_window": false}"#;
        let c = read(qwen).unwrap();
        assert_eq!(c.arch(), Architecture::Qwen2);
        assert_eq!((c.head_dim(), c.kv_heads()), (128, 16));
        let err = read(&qwen.replace("Qwen2ForCausalLM", "GemmaForCausalLM"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GemmaForCausalLM") && err.contains("config.json"),
            "{err}"
        );
        let err = read(&qwen.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"type\": \"yarn\"}",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("rope_scaling"), "{err}");
        // transformers 5 keeps the rotary settings in rope_parameters.
        let v5 = qwen
            .replace(
                "\"rope_theta\": 1000000.0,",
                "\"rope_parameters\": {\"rope_theta\": 100000.0, \"rope_type\": \"default\"},",
            )
            .replace("\"rope_scaling\": null,", "");
        assert_eq!(read(&v5).unwrap().rope_theta(), 100_000.0);
        assert_eq!(c.rope_theta(), 1_000_000.0);
    }
}
