//! The path every completion request takes (OpenAI's `/v1/chat/completions` and
//! `/v1/completions`, llama.cpp's `/infill` and `/completion`): check and parse the body,
//! apply the rate limits, route to the student or the teacher (falling back before the first
//! byte when the plan allows), and tag the answer with the backend that produced it. What
//! the student does with the request is the API's own (`chat.rs`, `completions.rs`,
//! `llamacpp.rs`).

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde_json::Value;

use super::render::TokenMeter;
use super::shutdown::until_shutdown;
use super::{AppState, auth, chat, completions, llamacpp, read_body};
use crate::error::DuetError;
use crate::rate_limit::ClientId;
use crate::router::{Plan, Route};
use crate::teacher::TeacherReply;

/// Names the backend that answered, on every response.
const BACKEND_HEADER: &str = "x-duet-backend";

/// The APIs that go through [`dispatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    /// llama.cpp's `/infill` and `/completion`: served by the local model only.
    Infill,
    LlamaCompletion,
}

impl Api {
    /// The path of the same API on the teacher.
    fn upstream_path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Completions | Self::Infill | Self::LlamaCompletion => "completions",
        }
    }

    fn is_llamacpp(self) -> bool {
        matches!(self, Self::Infill | Self::LlamaCompletion)
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DuetError> {
    dispatch(state, http, payload, Api::Chat).await
}

/// `POST /v1/completions`.
pub async fn text_completions(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DuetError> {
    dispatch(state, http, payload, Api::Completions).await
}

/// llama.cpp's `POST /infill`.
pub async fn infill(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DuetError> {
    dispatch(state, http, payload, Api::Infill).await
}

/// llama.cpp's `POST /completion`.
pub async fn llama_completion(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DuetError> {
    dispatch(state, http, payload, Api::LlamaCompletion).await
}

async fn dispatch(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
    api: Api,
) -> Result<HttpResponse, DuetError> {
    let address = state
        .trusted_proxies
        .client_address(http.peer_addr().map(|a| a.ip()), http.headers());
    let client = ClientId::of(auth::bearer_token(http.headers()), address);
    let rate_headers = state.rate_limits.check(client).await?;
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
    let plan = if api.is_llamacpp() {
        // llama.cpp's own endpoints name no model: they are the local model's.
        if state.student.is_none() {
            return Err(DuetError::UnknownEndpoint(format!(
                "{} needs the local model, and this duet runs in teacher mode",
                http.path()
            )));
        }
        Plan {
            first: Route::Student,
            fallback: None,
        }
    } else {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                DuetError::invalid("model", "`model` must be a string naming a model")
            })?;
        state
            .router
            .plan(model)
            .ok_or_else(|| DuetError::ModelNotFound(model.to_string()))?
    };
    let meter = |route: &Route| token_meter(&state, client, route.name());
    let first = &plan.first;
    let (route, result) = match answer(&state, api, first, &request, meter(first)).await {
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
                answer(&state, api, fallback, &request, meter(fallback)).await,
            )
        }
        result => (first, result),
    };
    let mut response = with_backend(result.unwrap_or_else(|e| e.error_response()), route);
    let status = response.status();
    state
        .metrics
        .requests
        .with_label_values(&[route.name(), status.as_str()])
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

/// Charges a completion's tokens to its client's token limits and to the metrics.
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

/// Asks one backend; an error here means nothing was sent to the client yet.
async fn answer(
    state: &AppState,
    api: Api,
    route: &Route,
    request: &Value,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    match route {
        Route::Student => match api {
            Api::Chat => chat::student_answer(state, request, meter).await,
            Api::Completions => completions::student_answer(state, request, meter).await,
            Api::Infill => llamacpp::infill(state, request, meter).await,
            Api::LlamaCompletion => llamacpp::completion(state, request, meter).await,
        },
        Route::Teacher { upstream_model } => {
            let teacher = state
                .teacher
                .as_ref()
                .ok_or_else(|| DuetError::Internal("no teacher in student mode".into()))?;
            let mut upstream = request.clone();
            upstream["model"] = Value::String(upstream_model.clone());
            Ok(
                match teacher.forward(api.upstream_path(), &upstream).await? {
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
                },
            )
        }
    }
}

/// Every response names the backend that produced it.
fn with_backend(mut response: HttpResponse, route: &Route) -> HttpResponse {
    response.headers_mut().insert(
        HeaderName::from_static(BACKEND_HEADER),
        HeaderValue::from_static(route.name()),
    );
    response
}

/// `usage.completion_tokens` of a teacher's JSON answer (0 when absent).
fn completion_tokens_in(body: &[u8]) -> u32 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}
