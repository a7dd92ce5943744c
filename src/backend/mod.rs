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
    /// An assistant's calls, as chat templates read them (`arguments` an object).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// Functions the model may call (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// The tools as the client sent them, for the chat template.
    pub tools: Vec<serde_json::Value>,
    /// Each function's name and the JSON schema of its arguments.
    pub functions: Vec<(String, serde_json::Value)>,
    pub choice: ToolChoice,
    /// Whether several calls may come in one answer.
    pub parallel: bool,
}

/// Whether the model must call a tool.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Text or calls, as the model decides.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// What the model reads before it generates.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Text read as it is; special tokens written in it (FIM markers, `<|im_start|>`)
    /// become single tokens.
    Text(String),
    /// Token ids, as a client sent them.
    Tokens(Vec<u32>),
    /// Fill-in-the-middle: the model's own FIM tokens around the code before and after the
    /// cursor, other files first.
    Infill(Infill),
}

/// The pieces of a fill-in-the-middle prompt (llama.cpp's `/infill`, or `suffix`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Infill {
    /// Code before the cursor.
    pub prefix: String,
    /// Code after the cursor.
    pub suffix: String,
    /// Text after the prefix that the model reads but the answer leaves out (llama.cpp's
    /// `prompt`: what was typed of the line since the request's prefix was cut).
    pub prompt: String,
    /// Other files for context, laid out repo-style when the model has the tokens for it.
    pub extra: Vec<ExtraFile>,
    /// Columns of indentation a generated line needs to still belong to the middle
    /// (llama.cpp's `n_indent`); the cursor line's indentation when absent.
    pub indent: Option<usize>,
}

/// A file given as context to a fill-in-the-middle completion.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraFile {
    pub filename: String,
    pub text: String,
}

impl Prompt {
    /// Bytes of text in the prompt (what admission charges before it is tokenized).
    pub fn text_bytes(&self) -> u64 {
        let bytes = match self {
            Self::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Self::Text(text) => text.len(),
            Self::Tokens(ids) => ids.len(),
            Self::Infill(infill) => {
                infill.prefix.len()
                    + infill.suffix.len()
                    + infill.prompt.len()
                    + infill
                        .extra
                        .iter()
                        .map(|f| f.filename.len() + f.text.len())
                        .sum::<usize>()
            }
        };
        bytes as u64
    }

    /// Pieces the template or the FIM layout adds tokens around (messages, files).
    pub fn pieces(&self) -> u64 {
        match self {
            Self::Chat(messages) => messages.len() as u64,
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::Infill(infill) => 1 + infill.extra.len() as u64,
        }
    }
}

/// A request after validation: everything a backend needs and nothing of the wire.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// The client's cap on generated tokens, if it gave one (0: read the prompt only,
    /// keeping it in the prompt cache, as an IDE's warm-up call does).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// How long the model stays loaded after this request (`keep_alive`, as in Ollama).
    pub keep_alive: Option<KeepAlive>,
    /// Report each generated token's log probability and this many likeliest alternatives.
    pub logprobs: Option<usize>,
    /// Send the prompt's text back before the completion (legacy completions' `echo`).
    pub echo: bool,
    /// Stop generating this long after the first token (llama.cpp's `t_max_predict_ms`).
    pub time_limit: Option<std::time::Duration>,
    /// What the output must follow, held to it while it is sampled.
    pub grammar: Option<Grammar>,
    /// Functions the model may call.
    pub tools: Option<ToolUse>,
}

/// A shape the output must have.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// JSON following a JSON schema (OpenAI's `response_format`: `json_schema`, or
    /// `json_object`: any object).
    Json(serde_json::Value),
}

impl GenerationRequest {
    /// A request for `prompt` with default sampling and nothing else set.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: vec![],
            keep_alive: None,
            logprobs: None,
            echo: false,
            time_limit: None,
            grammar: None,
            tools: None,
        }
    }
}

/// A generated token's log probability, and the likeliest alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

/// A token as clients see it in logprobs: its text (lossy where it is part of a character)
/// and its raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

/// What a running generation reports, in order: text pieces, then one `Done` or `Error`.
#[derive(Debug)]
pub enum GenEvent {
    /// New text, the tokens generated since the last text (for rate limits when an answer
    /// ends early), and (when asked for) the log probabilities of the tokens it came from.
    Text {
        text: String,
        tokens: u32,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(DuetError),
}

/// What a backend read of the prompt before it started generating.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PromptRead {
    pub tokens: u32,
    /// Whether the prompt was cut to fit the context (fill-in-the-middle only).
    pub truncated: bool,
}

/// A generation that has started: its prompt is processed and events are flowing.
/// Dropping `events` cancels it at the next token.
pub struct Generation {
    pub prompt: PromptRead,
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
    /// 0 means greedy (argmax). `None` here and below: the client left it to the server
    /// (the model's recommended value, else llama.cpp's default).
    pub temperature: Option<f32>,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: Option<f32>,
    /// Keep only the `top_k` likeliest tokens (0: all).
    pub top_k: Option<usize>,
    /// Drop tokens less likely than `min_p` times the likeliest (0: none).
    pub min_p: Option<f32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Added to the logits of these tokens before sampling (-100 bans, 100 forces).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: vec![],
        }
    }
}

/// Sampling a request gets for the fields it leaves out: the model's recommendation (GGUF
/// `general.sampling.*`) where it gives one, else llama.cpp's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
}

impl Default for SamplingDefaults {
    /// llama.cpp's: answers a person wants to read, not a raw draw from the distribution.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
        }
    }
}
