//! What a model will cost in memory, estimated from its GGUF header before any weight is
//! read: the weights as stored (duet keeps them quantized), the tokenizer built from the
//! vocabulary, the runtime around them, the activation buffers of the largest forward pass,
//! and key/value cache bytes per token.

use super::gguf::{self, GgufHeader};
use crate::error::DuetError;
use crate::memory::human;
use crate::student::model::ModelShape;

/// Bytes per vocabulary entry or merge rule once the tokenizer is built (measured on
/// SmolLM2's and Qwen2.5's byte-level BPE: 120-150).
const TOKENIZER_BYTES_PER_ENTRY: u64 = 150;
/// The process around the model: code, HTTP workers, engine thread, buffers.
const RUNTIME_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    pub weight_bytes: u64,
    pub tokenizer_bytes: u64,
    pub runtime_bytes: u64,
    /// Buffers of a forward pass with a full prompt chunk beside `parallel` streams.
    pub activation_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// The longest sequence one request may use.
    pub context_length: u64,
}

impl Footprint {
    /// Estimates the footprint of the model whose header is `header` and shape `shape`,
    /// serving sequences of up to `context_length` tokens (already capped at what the model
    /// was trained for), `parallel` at a time, with passes that read up to `prefill_rows`
    /// prompt tokens.
    pub fn estimate(
        header: &GgufHeader,
        shape: &ModelShape,
        context_length: usize,
        prefill_rows: usize,
        parallel: usize,
    ) -> Self {
        let count = |key| {
            gguf::strings(header.metadata(), key)
                .map(|v| v.len() as u64)
                .unwrap_or(0)
        };
        let entries = count("tokenizer.ggml.tokens") + count("tokenizer.ggml.merges");
        Self {
            weight_bytes: header.tensor_bytes(),
            tokenizer_bytes: entries * TOKENIZER_BYTES_PER_ENTRY,
            runtime_bytes: RUNTIME_BYTES,
            activation_bytes: shape.activation_bytes(prefill_rows + parallel, parallel) as u64,
            kv_bytes_per_token: shape.kv_bytes_per_token() as u64,
            context_length: context_length as u64,
        }
    }

    /// Memory held while loaded, before any request.
    pub fn fixed_bytes(&self) -> u64 {
        self.weight_bytes + self.tokenizer_bytes + self.runtime_bytes + self.activation_bytes
    }

    /// Fixed memory plus one sequence of the full context.
    pub fn with_full_context(&self) -> u64 {
        self.fixed_bytes() + self.kv_bytes_per_token * self.context_length
    }

    /// Refuses a model that cannot fit in `budget`, giving both numbers.
    pub fn check(&self, budget: u64) -> Result<(), DuetError> {
        let need = self.with_full_context();
        if need <= budget {
            return Ok(());
        }
        Err(DuetError::ModelLoad(format!(
            "the model needs about {} (weights {}, tokenizer {}, runtime {}, activations {}, key/value cache {} for {} tokens) \
             but the memory budget is {} (memory.max_bytes); raise the budget or lower student.context_length",
            human(need),
            human(self.weight_bytes),
            human(self.tokenizer_bytes),
            human(self.runtime_bytes),
            human(self.activation_bytes),
            human(self.kv_bytes_per_token * self.context_length),
            self.context_length,
            human(budget),
        )))
    }
}
