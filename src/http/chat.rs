//! The student's answer to `POST /v1/chat/completions`: the request validated into a
//! conversation, generated, and shaped as OpenAI's `chat.completion` (one JSON body) or its
//! `chat.completion.chunk` stream (role delta, content deltas, finish chunk, usage chunk when
//! asked for, `[DONE]`), log probabilities included when asked for.

use std::sync::{Arc, Mutex, PoisonError};

use actix_web::HttpResponse;
use actix_web::web::Bytes;
use serde_json::{Value, json};

use super::render::{Finished, Shape, TokenMeter, respond};
use super::tool_calls::{Piece, ToolCallText, split};
use super::{AppState, parse_wire, unix_now};
use crate::backend::{FinishReason, TokenLogprob, TokenText, Usage};
use crate::error::DuetError;
use crate::openai::sse;
use crate::openai::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, Delta,
};
use crate::openai::validate::validate;

/// Validates a chat request, runs it on the student and renders the answer.
pub async fn student_answer(
    state: &AppState,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let student = state.local_student()?;
    let wire = parse_wire::<ChatCompletionRequest>(request, "chat completion")?;
    let request = validate(wire, &state.input_limits)?;
    let logprobs = request.generation.logprobs.is_some();
    let tools = request.generation.tools.is_some();
    let generation = student.generate(request.generation).await?;
    let shape = Arc::new(ChatShape {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: request.model,
        include_usage: request.include_usage,
        logprobs,
        tool_calls: tools.then(Mutex::default),
    });
    respond(
        vec![generation],
        shape,
        request.stream,
        meter,
        state.shutdown.clone(),
    )
    .await
}

/// Fields shared by every chunk of one chat completion.
struct ChatShape {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    /// Splits calls out of the streamed text, when the request offered tools.
    tool_calls: Option<Mutex<ToolCallText>>,
}

/// One call as OpenAI writes it: in a message, or with `index` in a stream's delta.
fn call_json(index: Option<usize>, name: &str, arguments: &str) -> Value {
    let mut call = json!({
        "id": format!("call_{}", uuid::Uuid::new_v4().simple()),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    });
    if let Some(index) = index {
        call["index"] = json!(index);
    }
    call
}

impl ChatShape {
    /// Events for pieces of a tool-offering answer: content deltas, and calls as OpenAI
    /// streams them (index, id, type and name first, then the arguments in pieces).
    fn pieces(
        &self,
        index: u32,
        pieces: Vec<Piece>,
        calls_before: usize,
        logprobs: &[TokenLogprob],
    ) -> Bytes {
        let mut out = Vec::new();
        let mut call = calls_before;
        let mut logprobs = Some(logprobs);
        for piece in pieces {
            let (content, tool_calls) = match &piece {
                Piece::Content(text) => (Some(text.as_str()), None),
                Piece::Call { name, arguments } => {
                    call += 1;
                    (
                        None,
                        Some(json!([call_json(Some(call - 1), name, arguments)])),
                    )
                }
                Piece::Opened { name } => {
                    call += 1;
                    (None, Some(json!([call_json(Some(call - 1), name, "")])))
                }
                Piece::Arguments(more) => (
                    None,
                    Some(json!([{"index": call - 1, "function": {"arguments": more}}])),
                ),
            };
            let delta = Delta {
                role: None,
                content,
                tool_calls,
            };
            let lp = logprobs.take().and_then(|l| self.logprobs(l));
            out.extend_from_slice(&self.chunk(index, delta, None, lp));
        }
        Bytes::from(out)
    }

    /// A chunk carrying one choice's delta; `usage: null` on it when usage was asked for.
    fn chunk(
        &self,
        index: u32,
        delta: Delta<'_>,
        finish_reason: Option<FinishReason>,
        logprobs: Option<Value>,
    ) -> Bytes {
        let choice = ChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs,
        };
        self.event(vec![choice], self.include_usage.then_some(None))
    }

    fn event(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Option<Usage>>) -> Bytes {
        sse::event(&ChatCompletionChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices,
            usage,
        })
    }

    /// OpenAI's chat `logprobs` object for these tokens, when they were asked for.
    fn logprobs(&self, tokens: &[TokenLogprob]) -> Option<Value> {
        self.logprobs.then(|| {
            let entry = |t: &TokenText, logprob: f32| {
                json!({"token": t.text, "logprob": logprob, "bytes": t.bytes})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(&t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|(a, lp)| entry(a, *lp)).collect();
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        })
    }
}

impl Shape for ChatShape {
    fn whole(&self, choices: Vec<Finished>, usage: Usage) -> Value {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, f)| {
                let finish_reason = f.finish_reason.unwrap_or(FinishReason::Stop);
                let (content, tool_calls, finish_reason) = match &self.tool_calls {
                    Some(_) => {
                        let (content, calls) = split(&f.text);
                        let calls: Vec<Value> = calls
                            .iter()
                            .map(|(name, arguments)| call_json(None, name, arguments))
                            .collect();
                        // Cut by max_tokens, it says so whatever the calls.
                        let reason = if calls.is_empty() || finish_reason != FinishReason::Stop {
                            finish_reason
                        } else {
                            FinishReason::ToolCalls
                        };
                        (content, (!calls.is_empty()).then_some(calls), reason)
                    }
                    None => (Some(f.text), None, finish_reason),
                };
                Choice {
                    index: index as u32,
                    logprobs: self.logprobs(&f.logprobs),
                    message: AssistantMessage {
                        role: "assistant",
                        content,
                        refusal: None,
                        tool_calls,
                    },
                    finish_reason,
                }
            })
            .collect();
        serde_json::to_value(ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
        })
        .expect("wire types always serialize")
    }

    fn opening(&self, index: u32) -> Option<Bytes> {
        let role = Delta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        };
        Some(self.chunk(index, role, None, None))
    }

    fn piece(&self, index: u32, text: &str, logprobs: &[TokenLogprob]) -> Bytes {
        if let Some(parser) = &self.tool_calls {
            let mut parser = parser.lock().unwrap_or_else(PoisonError::into_inner);
            let before = parser.calls;
            let pieces = parser.push(text);
            return self.pieces(index, pieces, before, logprobs);
        }
        let delta = Delta {
            role: None,
            content: Some(text),
            tool_calls: None,
        };
        self.chunk(index, delta, None, self.logprobs(logprobs))
    }

    fn finished(&self, index: u32, reason: FinishReason, _usage: &Usage) -> Bytes {
        let Some(parser) = &self.tool_calls else {
            return self.chunk(index, Delta::default(), Some(reason), None);
        };
        let mut parser = parser.lock().unwrap_or_else(PoisonError::into_inner);
        let before = parser.calls;
        let rest = parser.finish();
        let mut out = self.pieces(index, rest, before, &[]).to_vec();
        let reason = if parser.calls > 0 && reason == FinishReason::Stop {
            FinishReason::ToolCalls
        } else {
            reason
        };
        out.extend_from_slice(&self.chunk(index, Delta::default(), Some(reason), None));
        Bytes::from(out)
    }

    fn closing(&self, usage: Usage) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(2);
        if self.include_usage {
            events.push(self.event(vec![], Some(Some(usage))));
        }
        events.push(Bytes::from_static(sse::DONE));
        events
    }
}
