//! A model's shape: its architecture and hyper-parameters, and what follows from them for
//! memory (activation buffers, key/value bytes per token).

use candle_core::DType;

use crate::error::DuetError;
use crate::student::cache::kv::KvCache;

/// The architectures duet can run; anything else is refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self, DuetError> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(DuetError::ModelLoad(format!(
                "unsupported model architecture `{other}`: duet runs `llama` and `qwen2` GGUF models"
            ))),
        }
    }

    /// The key prefix GGUF uses for this architecture's hyper-parameters.
    pub fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub architecture: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    pub vocab: usize,
    /// The context the model was trained for.
    pub trained_context: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
}

impl ModelShape {
    /// Bytes of the activation buffers a forward pass over `rows` rows keeps (f32 rows of every
    /// layer output, the feed-forward's two halves, their 8-bit quantized copies for the
    /// kernels, and one row of logits per sequence for `sequences`).
    pub fn activation_bytes(&self, rows: usize, sequences: usize) -> usize {
        let q_row = self.heads * self.head_dim;
        let kv_row = self.kv_heads * self.head_dim;
        // Quantized activations take 256 bytes per 64 values of the widest input: as much as
        // that input in f32.
        let quantized = self.hidden.max(self.ffn);
        let per_row = 3 * self.hidden + 2 * q_row + 2 * kv_row + 2 * self.ffn + quantized;
        (rows * per_row + sequences * self.vocab) * 4
    }

    /// An empty key/value cache for one sequence of this model.
    pub fn empty_cache(&self) -> KvCache {
        KvCache::new(self.layers, self.kv_heads * self.head_dim)
    }

    /// Bytes of key/value cache one token occupies across all layers (f16 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_heads * self.head_dim * 2 * DType::F16.size_in_bytes()
    }
}
