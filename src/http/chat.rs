//! The student's answer to `POST /v1/chat/completions`: the request validated into a
//! conversation, generated, and shaped as OpenAI's `chat.completion` (one JSON body) or its
//! `chat.completion.chunk` stream (role delta, content deltas, finish chunk, usage chunk when
//! asked for, `[DONE]`), log probabilities included when asked for.

use std::sync::Arc;

use actix_web::HttpResponse;
use actix_web::web::Bytes;
use serde_json::{Value, json};

use super::render::{Finished, Shape, TokenMeter, respond};
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
    let generation = student.generate(request.generation).await?;
    let shape = Arc::new(ChatShape {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: request.model,
        include_usage: request.include_usage,
        logprobs,
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
}

impl ChatShape {
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
            .map(|(index, f)| Choice {
                index: index as u32,
                logprobs: self.logprobs(&f.logprobs),
                message: AssistantMessage {
                    role: "assistant",
                    content: f.text,
                    refusal: None,
                },
                finish_reason: f.finish_reason.unwrap_or(FinishReason::Stop),
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
        };
        Some(self.chunk(index, role, None, None))
    }

    fn piece(&self, index: u32, text: &str, logprobs: &[TokenLogprob]) -> Bytes {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(index, delta, None, self.logprobs(logprobs))
    }

    fn finished(&self, index: u32, reason: FinishReason, _usage: &Usage) -> Bytes {
        self.chunk(index, Delta::default(), Some(reason), None)
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
