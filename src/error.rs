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
    /// No such path (or method) here (404).
    #[error(
        "no endpoint {0}; duet serves POST /v1/chat/completions, GET /v1/models and GET /health"
    )]
    UnknownEndpoint(String),
    /// The body is larger than `server.max_body_bytes` (413).
    #[error("the request body is larger than the limit of {limit} bytes (server.max_body_bytes)")]
    PayloadTooLarge { limit: usize },
    /// Too many requests are already waiting (503, retry later).
    #[error("{0}")]
    Overloaded(String),
    /// The model could not be loaded; clients see 503 with the reason.
    #[error("the model could not be loaded: {0}")]
    ModelLoad(String),
    /// A bug or an unexpected failure inside duet (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl DuetError {
    /// The OpenAI `type` field.
    fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::ModelNotFound(_)
            | Self::UnknownEndpoint(_)
            | Self::PayloadTooLarge { .. } => "invalid_request_error",
            Self::Overloaded(_) | Self::ModelLoad(_) => "server_error",
            Self::Internal(_) => "server_error",
        }
    }

    /// The OpenAI `code` field.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::UnknownEndpoint(_) => Some("unknown_url"),
            Self::PayloadTooLarge { .. } => Some("payload_too_large"),
            Self::Overloaded(_) => Some("overloaded"),
            Self::ModelLoad(_) => Some("model_unavailable"),
            Self::InvalidRequest { .. } | Self::Internal(_) => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
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
                kind: self.kind(),
                param: self.param().map(str::to_string),
                code: self.code(),
            },
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
        match self {
            Self::InvalidRequest { .. } | Self::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::ModelNotFound(_) | Self::UnknownEndpoint(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded(_) | Self::ModelLoad(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, "application/json"));
        if matches!(self, Self::Overloaded(_)) {
            response.insert_header((RETRY_AFTER, "1"));
        }
        response.body(serde_json::to_string(&self.body()).unwrap_or_default())
    }
}
