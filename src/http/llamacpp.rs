//! The student's answers in llama.cpp server's shapes: `POST /infill` and `POST /completion`
//! (one JSON object, or `data:` events of `{content, stop}` ending with a `stop: true` event
//! that carries the timings, and no `[DONE]`, as llama.cpp sends them), and `GET /props`.

use std::sync::Arc;
use std::time::Instant;

use actix_web::web::{self, Bytes};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{Value, json};

use super::render::{Finished, Shape, TokenMeter, respond};
use super::{AppState, parse_wire};
use crate::backend::{FinishReason, LoadState, PromptRead, SamplingDefaults, TokenLogprob, Usage};
use crate::error::DuetError;
use crate::llamacpp::{
    NativeRequest, ValidNative, pick_fields, validate_completion, validate_infill,
};
use crate::openai::sse;

/// `POST /infill`: fill-in-the-middle from the code around the cursor.
pub async fn infill(
    state: &AppState,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let valid = validate_infill(parse(request)?, &state.input_limits)?;
    answer(state, valid, meter).await
}

/// `POST /completion`: a raw prompt continued.
pub async fn completion(
    state: &AppState,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let valid = validate_completion(parse(request)?, &state.input_limits)?;
    answer(state, valid, meter).await
}

fn parse(request: &Value) -> Result<NativeRequest, DuetError> {
    parse_wire(request, "llama.cpp completion")
}

async fn answer(
    state: &AppState,
    valid: ValidNative,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let student = state.local_student()?;
    let requested = Instant::now();
    let generation = student.generate(valid.generation).await?;
    let shape = Arc::new(NativeShape {
        model: student.status().model,
        requested,
        prompt_read: Instant::now(),
        prompt: generation.prompt,
        response_fields: valid.response_fields,
    });
    respond(
        vec![generation],
        shape,
        valid.stream,
        meter,
        state.shutdown.clone(),
    )
    .await
}

struct NativeShape {
    model: String,
    requested: Instant,
    /// When the prompt had been read and generation began.
    prompt_read: Instant,
    prompt: PromptRead,
    response_fields: Option<Vec<String>>,
}

impl NativeShape {
    /// The fields of llama.cpp's last event (or whole answer) beside `content`.
    fn final_fields(&self, content: &str, reason: FinishReason, usage: &Usage) -> Value {
        let now = Instant::now();
        let prompt_ms = (self.prompt_read - self.requested).as_secs_f64() * 1e3;
        let predicted_ms = (now - self.prompt_read).as_secs_f64() * 1e3;
        let cached = usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
        let evaluated = usage.prompt_tokens.saturating_sub(cached);
        let per = |ms: f64, n: u32| {
            let per_token = if n > 0 { ms / f64::from(n) } else { 0.0 };
            let per_second = if ms > 0.0 {
                1e3 * f64::from(n) / ms
            } else {
                0.0
            };
            (per_token, per_second)
        };
        let (prompt_per_token_ms, prompt_per_second) = per(prompt_ms, evaluated);
        let (predicted_per_token_ms, predicted_per_second) =
            per(predicted_ms, usage.completion_tokens);
        json!({
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": 0,
            "stop": true,
            "model": self.model,
            "tokens_predicted": usage.completion_tokens,
            "tokens_evaluated": usage.prompt_tokens,
            "tokens_cached": cached,
            "truncated": self.prompt.truncated,
            "has_new_line": content.contains('\n'),
            "stop_type": match reason {
                // llama.cpp's completion endpoints take no tools.
                FinishReason::Stop | FinishReason::ToolCalls => "eos",
                FinishReason::Length => "limit",
            },
            "stopping_word": "",
            "timings": {
                "prompt_n": evaluated,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_per_token_ms,
                "prompt_per_second": prompt_per_second,
                "predicted_n": usage.completion_tokens,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_per_token_ms,
                "predicted_per_second": predicted_per_second,
            },
        })
    }

    fn probs(logprobs: &[TokenLogprob]) -> Value {
        logprobs
            .iter()
            .map(|t| {
                json!({
                    "token": t.token.text,
                    "logprob": t.logprob,
                    "bytes": t.token.bytes,
                    "top_logprobs": t.top.iter().map(|(a, lp)| json!({
                        "token": a.text, "logprob": lp, "bytes": a.bytes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

impl Shape for NativeShape {
    fn whole(&self, choices: Vec<Finished>, usage: Usage) -> Value {
        let finished = choices.into_iter().next().unwrap_or_default();
        let reason = finished.finish_reason.unwrap_or(FinishReason::Stop);
        let mut answer = self.final_fields(&finished.text, reason, &usage);
        if !finished.logprobs.is_empty() {
            answer["completion_probabilities"] = Self::probs(&finished.logprobs);
        }
        match &self.response_fields {
            Some(paths) => pick_fields(&answer, paths),
            None => answer,
        }
    }

    fn piece(&self, _index: u32, text: &str, logprobs: &[TokenLogprob]) -> Bytes {
        let mut event =
            json!({"index": 0, "content": text, "tokens": [], "stop": false, "id_slot": 0});
        if !logprobs.is_empty() {
            event["completion_probabilities"] = Self::probs(logprobs);
        }
        sse::event(&event)
    }

    fn finished(&self, _index: u32, reason: FinishReason, usage: &Usage) -> Bytes {
        sse::event(&self.final_fields("", reason, usage))
    }

    fn closing(&self, _usage: Usage) -> Vec<Bytes> {
        vec![] // llama.cpp's native stream ends with its `stop: true` event
    }

    fn error(&self, error: &DuetError) -> Vec<Bytes> {
        vec![sse::event(&error.body())]
    }
}

/// `GET /props`: the server's properties as llama.cpp reports them (what Zed's llama.cpp
/// provider and llama.vscode read). Never loads the model.
pub async fn props(state: web::Data<AppState>) -> HttpResponse {
    let Some(student) = &state.student else {
        return DuetError::UnknownEndpoint(
            "GET /props describes the local model, and this duet runs in teacher mode".into(),
        )
        .error_response();
    };
    let status = student.status();
    let n_ctx = match status.state {
        LoadState::Ready { context_length, .. } => context_length,
        _ => state.student_config.context_length,
    };
    // Before the model is read its own recommendations are unknown: llama.cpp's stand in.
    let sampling = state
        .student_config
        .sampling
        .over(SamplingDefaults::default());
    HttpResponse::Ok().json(json!({
        "default_generation_settings": {
            "n_ctx": n_ctx,
            "model": status.model,
            "params": {
                "n_predict": state.student_config.max_new_tokens,
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
                "min_p": sampling.min_p,
            },
        },
        "total_slots": state.student_config.parallel,
        "model_path": state.student_config.model,
        "modalities": {"vision": false, "audio": false},
        "chat_template_caps": {
            "supports_tools": true,
            "supports_tool_calls": true,
            "supports_system_role": true,
            "supports_parallel_tool_calls": true,
        },
        "build_info": concat!("duet ", env!("CARGO_PKG_VERSION")),
    }))
}
