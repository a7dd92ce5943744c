//! What a local model backend reports about itself in `/health` and `/metrics`: where its
//! weights are (unloaded, loading, ready, failed with the reason), how its generations ended,
//! and how many sequences its forward passes carried.

use serde::Serialize;

/// Where the student's weights are, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum LoadState {
    /// Nothing loaded yet: the first chat request loads the model.
    Unloaded,
    Loading,
    Ready {
        load_seconds: f64,
        /// Bytes of weights held (the GGUF's tensors, still quantized).
        weight_bytes: u64,
        /// The footprint estimated from the GGUF header before loading (without requests).
        estimated_bytes: u64,
        /// The process's resident memory right after loading.
        measured_rss_bytes: u64,
        context_length: usize,
        /// Key/value cache one token of context occupies.
        kv_bytes_per_token: usize,
    },
    Failed {
        reason: String,
    },
}

/// Shared view of the engine's state, for `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct StudentStatus {
    pub model: String,
    /// The instruction-set level of the kernels its arithmetic runs on (`student.kernels`).
    pub kernels: &'static str,
    #[serde(flatten)]
    pub state: LoadState,
    /// How many times the weights were loaded since start.
    pub loads: u32,
    /// Generations that ran to their end.
    pub completed: u64,
    /// Generations stopped early because their client went away.
    pub cancelled: u64,
    /// Forward passes run since start, and the sequences they carried in all: their ratio
    /// is the mean batch size (1.0 when requests run one at a time).
    pub forward_passes: u64,
    pub batched_sequences: u64,
}

impl StudentStatus {
    /// A model that has not been loaded yet.
    pub fn unloaded(model: String, kernels: &'static str) -> Self {
        Self {
            model,
            kernels,
            state: LoadState::Unloaded,
            loads: 0,
            completed: 0,
            cancelled: 0,
            forward_passes: 0,
            batched_sequences: 0,
        }
    }

    /// Adds a generation's end to the counters.
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Failed => {}
        }
    }
}

/// How a generation ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Completed,
    /// The client went away; generation stopped at the next token.
    Cancelled,
    /// The request could not be served (refused or failed); the client was told why.
    Failed,
}
