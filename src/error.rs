//! duet's one error type and the one table that turns each error into an HTTP status and
//! an OpenAI-shaped body: `{"error": {"message", "type", "param", "code"}}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Everything that can go wrong between a request arriving and its answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DuetError {
    /// The request is malformed or asks for something impossible (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The request needs what the local model cannot do (images, several choices, ...) (400; in
    /// hybrid mode such requests go to the teacher instead).
    #[error("{message}")]
    Unsupported { message: String, param: String },
    /// Prompt plus requested completion do not fit the context window (400).
    #[error(
        "this model's context is {context} tokens; the messages take {prompt_tokens} and max_tokens asks for {max_tokens} more"
    )]
    ContextLengthExceeded {
        context: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    /// The requested model is not served here (404).
    #[error("the model `{0}` does not exist; GET /v1/models lists the models duet serves")]
    ModelNotFound(String),
    /// A missing or wrong client API key (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The body is not JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The client stopped sending its body (408).
    #[error("the request body stalled for more than {0} ms (server.read_timeout_ms)")]
    RequestTimeout(u64),
    /// duet is shutting down; sent as the last event of streams cut at the end of the grace period.
    #[error("duet is shutting down; retry against a running instance")]
    ShuttingDown,
    /// No such path (or method) here (404).
    #[error(
        "no endpoint {0}; duet serves POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"
    )]
    UnknownEndpoint(String),
    /// The body is larger than `server.max_body_bytes` (413).
    #[error("the request body is larger than the limit of {limit} bytes (server.max_body_bytes)")]
    PayloadTooLarge { limit: usize },
    /// The queue or the memory budget is full (429 with Retry-After; hybrid: the teacher).
    #[error("{0}")]
    Overloaded(String),
    /// The model could not be loaded; clients see 503 with the reason.
    #[error("the model could not be loaded: {0}")]
    ModelLoad(String),
    /// A client or the server went over a rate limit (429 with Retry-After).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
        headers: Vec<(&'static str, String)>,
    },
    /// The shared rate limits' Redis cannot be reached and `limits.redis_failure` is
    /// `refuse` (503 with Retry-After).
    #[error("rate limits are counted in Redis, which cannot be reached right now; retry shortly")]
    LimitsUnavailable,
    /// The teacher could not be reached, answered 5xx, or sent something unusable (502).
    #[error("{0}")]
    TeacherUnavailable(String),
    /// The teacher did not answer in time (504).
    #[error("{0}")]
    TeacherTimeout(String),
    /// The teacher is rate limiting duet (429, with the teacher's Retry-After).
    #[error("the teacher is rate limiting requests; retry later")]
    TeacherRateLimited { retry_after: Option<String> },
    /// The teacher refused duet's API key (502: the client's request was fine).
    #[error(
        "the teacher refused duet's API key (HTTP {0}); check the variable named by teacher.api_key_env"
    )]
    TeacherRejectedKey(u16),
    /// A bug or an unexpected failure inside duet (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl DuetError {
    /// The one table: HTTP status, OpenAI `type` and OpenAI `code` of every error.
    fn table(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        const INVALID: &str = "invalid_request_error";
        match self {
            Self::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, INVALID, None),
            Self::Unsupported { .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some("unsupported_parameter"),
            ),
            Self::ContextLengthExceeded { .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some("context_length_exceeded"),
            ),
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, INVALID, Some("model_not_found")),
            Self::UnknownEndpoint(_) => (StatusCode::NOT_FOUND, INVALID, Some("unknown_url")),
            Self::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                Some("payload_too_large"),
            ),
            Self::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "server_error",
                Some("overloaded"),
            ),
            Self::ModelLoad(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_unavailable"),
            ),
            Self::TeacherUnavailable(_) | Self::TeacherRejectedKey(_) => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("teacher_unavailable"),
            ),
            Self::TeacherTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                Some("teacher_timeout"),
            ),
            Self::TeacherRateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, INVALID, Some("invalid_api_key")),
            Self::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                INVALID,
                Some("unsupported_media_type"),
            ),
            Self::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                INVALID,
                Some("request_timeout"),
            ),
            Self::LimitsUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("rate_limits_unavailable"),
            ),
            Self::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
            ),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }

    /// A teacher failure that a second attempt may not repeat (connection, timeout, 5xx).
    pub fn is_transient_teacher_failure(&self) -> bool {
        matches!(self, Self::TeacherUnavailable(_) | Self::TeacherTimeout(_))
    }

    /// Whether the other backend may answer instead (hybrid fallback): the student is
    /// busy, failed to load or cannot do what is asked; or the teacher is unreachable,
    /// slow, failing or rate limiting.
    pub fn allows_fallback(&self) -> bool {
        matches!(
            self,
            Self::Unsupported { .. }
                | Self::Overloaded(_)
                | Self::ModelLoad(_)
                | Self::TeacherUnavailable(_)
                | Self::TeacherTimeout(_)
                | Self::TeacherRateLimited { .. }
        )
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::Unsupported { param, .. } => Some(param),
            Self::ContextLengthExceeded { .. } => Some("messages"),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The body clients receive, also used for SSE error events.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.table().1,
                param: self.param().map(str::to_string),
                code: self.table().2,
            },
        }
    }

    /// Shorthand for a request field the local model cannot honour.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::Unsupported {
            message: message.into(),
            param: param.to_string(),
        }
    }

    /// Shorthand for a 400 about one request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

/// `{"error": {...}}` as OpenAI sends it.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ResponseError for DuetError {
    fn status_code(&self) -> StatusCode {
        self.table().0
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, "application/json"));
        match self {
            Self::Overloaded(_) | Self::LimitsUnavailable => {
                response.insert_header((RETRY_AFTER, "1"));
            }
            Self::RateLimited {
                retry_after_secs,
                headers,
                ..
            } => {
                response.insert_header((RETRY_AFTER, retry_after_secs.to_string()));
                for (name, value) in headers {
                    response.insert_header((*name, value.as_str()));
                }
            }
            Self::TeacherRateLimited { retry_after } => {
                response.insert_header((RETRY_AFTER, retry_after.as_deref().unwrap_or("1")));
            }
            _ => {}
        }
        response.body(serde_json::to_string(&self.body()).unwrap_or_default())
    }
}
