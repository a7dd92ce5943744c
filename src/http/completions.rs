//! The student's answer to `POST /v1/completions` (OpenAI's legacy completions, what code
//! completion plugins send): one choice per prompt, shaped as `text_completion` objects, one
//! JSON body or a stream of chunks (each choice's text, then its `finish_reason` chunk,
//! the usage chunk when asked for, `[DONE]`), with OpenAI's `logprobs` object when asked for.

use std::sync::{Arc, Mutex};

use actix_web::HttpResponse;
use actix_web::web::Bytes;
use serde_json::{Map, Value, json};

use super::render::{Finished, Shape, TokenMeter, respond, token_offsets};
use super::{AppState, parse_wire, unix_now};
use crate::backend::{FinishReason, TokenLogprob, Usage};
use crate::error::DuetError;
use crate::openai::completions::{CompletionRequest, validate_completion};
use crate::openai::sse;

/// Validates a completion request, runs each prompt on the student (all at once, so they
/// share forward passes) and renders the answer.
pub async fn student_answer(
    state: &AppState,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let student = state.local_student()?;
    let wire = parse_wire::<CompletionRequest>(request, "completion")?;
    let request = validate_completion(wire, &state.input_limits)?;
    let logprobs = request.generations[0].logprobs.is_some();
    let choices = request.generations.len();
    let generations = futures::future::join_all(
        request
            .generations
            .into_iter()
            .map(|generation| student.generate(generation)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let shape = Arc::new(TextShape {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: request.model,
        include_usage: request.include_usage,
        logprobs,
        offsets: Mutex::new(vec![0; choices]),
    });
    respond(
        generations,
        shape,
        request.stream,
        meter,
        state.shutdown.clone(),
    )
    .await
}

struct TextShape {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    /// Characters each choice has sent so far (where the next token's `text_offset` is).
    offsets: Mutex<Vec<usize>>,
}

impl TextShape {
    fn object(&self, choices: Vec<Value>, usage: Option<Option<Usage>>) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(usage) = usage {
            object["usage"] = json!(usage);
        }
        object
    }

    fn choice(
        &self,
        index: u32,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        json!({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish})
    }

    /// OpenAI's completions `logprobs` object for `tokens`, starting at `text_offset`.
    fn logprobs(&self, tokens: &[TokenLogprob], text_offset: Vec<usize>) -> Option<Value> {
        if !self.logprobs {
            return None;
        }
        let top: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let map: Map<String, Value> = t
                    .top
                    .iter()
                    .map(|(alt, lp)| (alt.text.clone(), json!(lp)))
                    .collect();
                Value::Object(map)
            })
            .collect();
        Some(json!({
            "tokens": tokens.iter().map(|t| t.token.text.as_str()).collect::<Vec<_>>(),
            "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": text_offset,
        }))
    }

    /// Moves choice `index`'s offset past `text`, returning where `text` starts.
    fn advance_offset(&self, index: u32, text: &str) -> usize {
        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        let start = offsets[index as usize];
        offsets[index as usize] += text.chars().count();
        start
    }
}

impl Shape for TextShape {
    fn whole(&self, choices: Vec<Finished>, usage: Usage) -> Value {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, f)| {
                let logprobs = self.logprobs(&f.logprobs, f.text_offsets);
                self.choice(index as u32, &f.text, logprobs, f.finish_reason)
            })
            .collect();
        self.object(choices, Some(Some(usage)))
    }

    fn piece(&self, index: u32, text: &str, logprobs: &[TokenLogprob]) -> Bytes {
        let start = self.advance_offset(index, text);
        let logprobs = self.logprobs(logprobs, token_offsets(start, logprobs));
        let choice = self.choice(index, text, logprobs, None);
        sse::event(&self.object(vec![choice], self.include_usage.then_some(None)))
    }

    fn finished(&self, index: u32, reason: FinishReason, _usage: &Usage) -> Bytes {
        let choice = self.choice(index, "", None, Some(reason));
        sse::event(&self.object(vec![choice], self.include_usage.then_some(None)))
    }

    fn closing(&self, usage: Usage) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(2);
        if self.include_usage {
            events.push(sse::event(&self.object(vec![], Some(Some(usage)))));
        }
        events.push(Bytes::from_static(sse::DONE));
        events
    }
}
