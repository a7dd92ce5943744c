//! What every backend speaks: a validated [`GenerationRequest`] in, a typed stream of
//! [`GenEvent`]s out. The HTTP edge turns those events into SSE frames or one JSON body.

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::DuetError;
use crate::memory::KeepAlive;

mod status;
pub use crate::openai::types::{FinishReason, Usage};
pub use status::{LoadState, Outcome, StudentStatus};

/// One message of a conversation, with its role checked.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A chat request after validation: everything a backend needs and nothing of the wire.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// The client's cap on generated tokens, if it gave one.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// How long the model stays loaded after this request (`keep_alive`, as in Ollama).
    pub keep_alive: Option<KeepAlive>,
}

/// What a running generation reports, in order: text pieces, then one `Done` or `Error`.
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(DuetError),
}

/// A generation that has started: its prompt is processed and events are flowing.
/// Dropping `events` cancels it at the next token.
pub struct Generation {
    pub prompt_tokens: u32,
    pub events: mpsc::Receiver<GenEvent>,
}

/// A source of chat completions (the local student; an upstream teacher).
pub trait ChatBackend: Send + Sync {
    /// Starts generating; resolves once the first token can follow, or with the error
    /// that prevents it (so the HTTP status can still say what went wrong).
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'static, Result<Generation, DuetError>>;

    /// Where the backend's model is and what it has done, for `/health` and `/metrics`.
    fn status(&self) -> StudentStatus;
}

/// Sampling settings of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Keep only the `top_k` likeliest tokens (None: all).
    pub top_k: Option<usize>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}
