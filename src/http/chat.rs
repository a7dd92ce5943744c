//! `POST /v1/chat/completions`: parse and validate the body, start a generation, and
//! answer with one JSON body or a Server-Sent Events stream, as the client asked.

use std::time::Duration;

use actix_web::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue,
};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use futures::stream;

use super::shutdown::{ShutdownSignal, until_shutdown};
use super::{AppState, read_body, unix_now};
use crate::backend::{ChatBackend, FinishReason, GenEvent, Generation, Usage};
use crate::error::DuetError;
use crate::openai::sse;
use crate::openai::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, Delta,
};
use crate::openai::validate::validate;
use crate::rate_limit::ClientId;
use crate::router::Backend;
use crate::teacher::TeacherReply;
use serde_json::Value;

/// A quiet stream gets a comment line this often so proxies and clients keep it open.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// Names the backend that answered, on every response.
const BACKEND_HEADER: &str = "x-duet-backend";

pub async fn completions(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DuetError> {
    let client = ClientId::of(bearer_token(&http), http.peer_addr().map(|a| a.ip()));
    let rate_headers = state.rate_limits.check(client)?;
    if let Some(content_type) = http.headers().get(CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or("").to_ascii_lowercase();
        if !content_type.starts_with("application/json") {
            return Err(DuetError::UnsupportedMediaType(format!(
                "the body must be JSON sent as `Content-Type: application/json`, not `{content_type}`"
            )));
        }
    }
    let body = read_body(payload, state.max_body_bytes, state.read_timeout).await?;
    if std::str::from_utf8(&body).is_err() {
        return Err(DuetError::invalid(
            "body",
            "the request body is not valid UTF-8",
        ));
    }
    let request: Value = serde_json::from_slice(&body).map_err(|e| DuetError::InvalidRequest {
        message: format!("the request body is not valid JSON: {e}"),
        param: None,
    })?;
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| DuetError::invalid("model", "`model` must be a string naming a model"))?;
    let plan = state
        .router
        .plan(model)
        .ok_or_else(|| DuetError::ModelNotFound(model.to_string()))?;
    let meter = |backend: &Backend| token_meter(&state, client, backend.name());
    let first = &plan.first;
    let (backend, result) = match answer(&state, first, &request, meter(first)).await {
        Err(e) if e.allows_fallback() && plan.fallback.is_some() => {
            let fallback = plan.fallback.as_ref().expect("checked above");
            tracing::info!(reason = %e, to = fallback.name(), "falling back");
            state
                .metrics
                .fallbacks
                .with_label_values(&[first.name(), fallback.name()])
                .inc();
            (
                fallback,
                answer(&state, fallback, &request, meter(fallback)).await,
            )
        }
        result => (first, result),
    };
    let mut response = with_backend(result.unwrap_or_else(|e| e.error_response()), backend);
    let status = response.status();
    state
        .metrics
        .requests
        .with_label_values(&[backend.name(), status.as_str()])
        .inc();
    for (name, value) in rate_headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// Charges the tokens a completion generated to its client's token limits.
type TokenMeter = Box<dyn FnOnce(u32) + Send>;

fn token_meter(state: &web::Data<AppState>, client: ClientId, backend: &'static str) -> TokenMeter {
    let state = state.clone();
    Box::new(move |generated| {
        state.rate_limits.charge_tokens(client, generated);
        state
            .metrics
            .generated_tokens
            .with_label_values(&[backend])
            .inc_by(u64::from(generated));
    })
}

/// The token of `Authorization: Bearer <token>`, when present.
fn bearer_token(http: &HttpRequest) -> Option<&str> {
    http.headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Asks one backend; an error here means nothing was sent to the client yet.
async fn answer(
    state: &AppState,
    backend: &Backend,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let response = match backend {
        Backend::Student => {
            let student = state
                .student
                .as_ref()
                .ok_or_else(|| DuetError::Internal("no student in teacher mode".into()))?;
            let wire: ChatCompletionRequest =
                serde_json::from_value(request.clone()).map_err(|e| DuetError::InvalidRequest {
                    message: format!(
                        "the request body is not a valid chat completion request: {e}"
                    ),
                    param: None,
                })?;
            let request = validate(wire, &state.input_limits)?;
            let generation = student.generate(request.generation).await?;
            let meta = CompletionMeta {
                id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
                created: unix_now(),
                model: request.model,
            };
            if request.stream {
                stream_response(
                    generation,
                    meta,
                    request.include_usage,
                    meter,
                    state.shutdown.clone(),
                )
            } else {
                whole_response(generation, meta, meter).await?
            }
        }
        Backend::Teacher { upstream_model } => {
            let teacher = state
                .teacher
                .as_ref()
                .ok_or_else(|| DuetError::Internal("no teacher in student mode".into()))?;
            let mut upstream = request.clone();
            upstream["model"] = Value::String(upstream_model.clone());
            match teacher.forward(&upstream).await? {
                TeacherReply::Body { status, body } => {
                    meter(completion_tokens_in(&body));
                    HttpResponse::build(status)
                        .insert_header((CONTENT_TYPE, "application/json"))
                        .body(body)
                }
                TeacherReply::Stream(stream) => HttpResponse::Ok()
                    .insert_header((CONTENT_TYPE, "text/event-stream"))
                    .insert_header((CACHE_CONTROL, "no-cache"))
                    .streaming(until_shutdown(stream.into_body(), state.shutdown.clone())),
            }
        }
    };
    Ok(response)
}

/// Every response names the backend that produced it.
fn with_backend(mut response: HttpResponse, backend: &Backend) -> HttpResponse {
    response.headers_mut().insert(
        HeaderName::from_static(BACKEND_HEADER),
        HeaderValue::from_static(backend.name()),
    );
    response
}

/// Fields shared by every chunk of one completion.
struct CompletionMeta {
    id: String,
    created: u64,
    model: String,
}

impl CompletionMeta {
    fn chunk(
        &self,
        delta: Delta<'_>,
        finish_reason: Option<FinishReason>,
        include_usage: bool,
    ) -> Bytes {
        sse::event(&ChatCompletionChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
            }],
            usage: include_usage.then_some(None),
        })
    }

    fn usage_chunk(&self, usage: Usage) -> Bytes {
        sse::event(&ChatCompletionChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices: vec![],
            usage: Some(Some(usage)),
        })
    }
}

/// `usage.completion_tokens` of a teacher's JSON answer (0 when absent).
fn completion_tokens_in(body: &[u8]) -> u32 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
        .map_or(0, |n| n as u32)
}

async fn whole_response(
    mut generation: Generation,
    meta: CompletionMeta,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let mut content = String::new();
    loop {
        match generation.events.recv().await {
            Some(GenEvent::Text(t)) => content.push_str(&t),
            Some(GenEvent::Done {
                finish_reason,
                usage,
            }) => {
                meter(usage.completion_tokens);
                return Ok(HttpResponse::Ok().json(ChatCompletion {
                    id: meta.id,
                    object: "chat.completion",
                    created: meta.created,
                    model: meta.model,
                    system_fingerprint: None,
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content,
                            refusal: None,
                        },
                        finish_reason,
                        logprobs: None,
                    }],
                    usage,
                }));
            }
            Some(GenEvent::Error(e)) => return Err(e),
            None => {
                return Err(DuetError::Internal(
                    "generation ended without finishing".into(),
                ));
            }
        }
    }
}

/// Where a stream is: the role chunk first, then deltas, the finish chunk, the usage
/// chunk when asked for, and `[DONE]`.
enum Phase {
    Role,
    Deltas,
    Usage(Usage),
    Done,
    End,
}

fn stream_response(
    generation: Generation,
    meta: CompletionMeta,
    include_usage: bool,
    meter: TokenMeter,
    shutdown: ShutdownSignal,
) -> HttpResponse {
    let state = (generation, meta, Phase::Role, Some(meter));
    // Dropping this stream (the client went away) drops the event receiver, which stops
    // the generation at its next token.
    let body = stream::unfold(
        state,
        move |(mut generation, meta, phase, mut meter)| async move {
            let (bytes, next) = match phase {
                Phase::Role => {
                    let role = Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    };
                    (meta.chunk(role, None, include_usage), Phase::Deltas)
                }
                Phase::Deltas => {
                    match tokio::time::timeout(KEEP_ALIVE_EVERY, generation.events.recv()).await {
                        Err(_) => (Bytes::from_static(sse::KEEP_ALIVE), Phase::Deltas),
                        Ok(Some(GenEvent::Text(t))) => (
                            meta.chunk(
                                Delta {
                                    role: None,
                                    content: Some(&t),
                                },
                                None,
                                include_usage,
                            ),
                            Phase::Deltas,
                        ),
                        Ok(Some(GenEvent::Done {
                            finish_reason,
                            usage,
                        })) => {
                            if let Some(meter) = meter.take() {
                                meter(usage.completion_tokens);
                            }
                            let next = if include_usage {
                                Phase::Usage(usage)
                            } else {
                                Phase::Done
                            };
                            (
                                meta.chunk(Delta::default(), Some(finish_reason), include_usage),
                                next,
                            )
                        }
                        Ok(Some(GenEvent::Error(e))) => (sse::event(&e.body()), Phase::Done),
                        Ok(None) => {
                            let e =
                                DuetError::Internal("generation ended without finishing".into());
                            (sse::event(&e.body()), Phase::Done)
                        }
                    }
                }
                Phase::Usage(usage) => (meta.usage_chunk(usage), Phase::Done),
                Phase::Done => (Bytes::from_static(sse::DONE), Phase::End),
                Phase::End => return None,
            };
            Some((
                Ok::<_, actix_web::Error>(bytes),
                (generation, meta, next, meter),
            ))
        },
    );
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .streaming(until_shutdown(body, shutdown))
}
