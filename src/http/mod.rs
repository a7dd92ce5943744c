//! The HTTP edge: routes, shared state, and the OpenAI-shaped answers to requests that
//! never reach a handler (unknown paths, wrong methods).

pub mod auth;
pub mod chat;
pub mod client_address;
pub mod completions;
pub mod dispatch;
pub mod health;
pub mod llamacpp;
pub mod metrics;
pub mod models;
pub mod page;
pub mod ready;
pub mod render;
pub mod shutdown;
pub mod tool_calls;

use std::sync::Arc;

use actix_web::web::{self, ServiceConfig};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use futures::StreamExt;

use crate::admission::Admission;
use crate::backend::ChatBackend;
use crate::config::Mode;
use crate::error::DuetError;
use crate::rate_limit::RateLimits;
use crate::router::Router;
use crate::teacher::Teacher;

/// What every handler shares; built once, outside `HttpServer::new`.
pub struct AppState {
    /// What answers for the local model (the student's engine); absent in teacher mode,
    /// where no weights are ever loaded.
    pub student: Option<Arc<dyn ChatBackend>>,
    pub teacher: Option<Arc<Teacher>>,
    pub router: Router,
    /// The memory ledger requests are admitted against.
    pub admission: Arc<Admission>,
    pub rate_limits: RateLimits,
    pub metrics: metrics::Metrics,
    pub mode: Mode,
    /// The teacher's base URL as `/health` shows it (without any credentials).
    pub teacher_url: Option<String>,
    /// When this server started (the `created` time of its model cards).
    pub started_at: u64,
    pub max_body_bytes: usize,
    /// Longest wait for the next piece of a request body.
    pub read_timeout: std::time::Duration,
    pub input_limits: crate::config::LimitsConfig,
    /// The student's settings (what `/props` reports before the model is loaded).
    pub student_config: crate::config::StudentConfig,
    pub client_keys: Arc<auth::ClientKeys>,
    /// Fires when the shutdown grace period is over.
    pub shutdown: shutdown::ShutdownSignal,
    /// Set on SIGTERM: `/ready` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    /// Whose forwarding headers name the client.
    pub trusted_proxies: client_address::TrustedProxies,
}

/// A JSON body read as the API's wire type `T` (`what` names it in the 400 otherwise).
pub fn parse_wire<T: serde::de::DeserializeOwned>(
    request: &serde_json::Value,
    what: &str,
) -> Result<T, DuetError> {
    T::deserialize(request).map_err(|e| DuetError::InvalidRequest {
        message: format!("the request body is not a valid {what} request: {e}"),
        param: None,
    })
}

impl AppState {
    /// The local model, for the handlers that only it can answer (all but the teacher's).
    pub fn local_student(&self) -> Result<&Arc<dyn ChatBackend>, DuetError> {
        self.student
            .as_ref()
            .ok_or_else(|| DuetError::Internal("no student in teacher mode".into()))
    }
}

/// CORS for the configured browser origins: none (off), some, or `*` (any).
pub fn cors(origins: &[String]) -> actix_web::middleware::Condition<actix_cors::Cors> {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "OPTIONS"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
        ])
        .max_age(3600);
    for origin in origins {
        cors = if origin == "*" {
            cors.allow_any_origin()
        } else {
            cors.allowed_origin(origin)
        };
    }
    actix_web::middleware::Condition::new(!origins.is_empty(), cors)
}

/// Mounts every endpoint.
pub fn routes(cfg: &mut ServiceConfig) {
    cfg.route("/", web::get().to(page::index))
        .route("/assets/app.js", web::get().to(page::app))
        .route("/assets/style.css", web::get().to(page::style))
        .route("/favicon.svg", web::get().to(page::favicon))
        .route("/favicon.ico", web::get().to(page::favicon))
        .route("/health", web::get().to(health::health))
        .route("/ready", web::get().to(ready::ready))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/v1/models", web::get().to(models::list))
        .route("/v1/models/{id:.*}", web::get().to(models::get))
        .route(
            "/v1/chat/completions",
            web::post().to(dispatch::chat_completions),
        )
        .route(
            "/chat/completions",
            web::post().to(dispatch::chat_completions),
        )
        .route(
            "/v1/completions",
            web::post().to(dispatch::text_completions),
        )
        .route("/completions", web::post().to(dispatch::text_completions))
        .route("/infill", web::post().to(dispatch::infill))
        .route("/completion", web::post().to(dispatch::llama_completion))
        .route("/props", web::get().to(llamacpp::props))
        .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    DuetError::UnknownEndpoint(format!("{} {}", req.method(), req.path())).error_response()
}

/// Reads the whole body, refusing it with 413 as soon as it passes `limit` and with 408
/// when the client stalls longer than `timeout` between two pieces.
pub async fn read_body(
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<web::Bytes, DuetError> {
    let mut body = web::BytesMut::new();
    loop {
        let next = tokio::time::timeout(timeout, payload.next())
            .await
            .map_err(|_| DuetError::RequestTimeout(timeout.as_millis() as u64))?;
        let Some(chunk) = next else {
            return Ok(body.freeze());
        };
        let chunk = chunk.map_err(|e| {
            DuetError::invalid("body", format!("could not read the request body: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(DuetError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
