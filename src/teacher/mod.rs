//! The teacher: an upstream OpenAI-compatible API that duet forwards requests to. Bodies go
//! upstream unchanged but for the model name; answers come back as they are, streamed ones
//! event by event as they arrive. Status and content type are checked before anything is
//! relayed, so a failing teacher can still be replaced by the student or reported with a
//! proper status. The API key travels only in the Authorization header.

pub mod sse;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use futures::stream::{BoxStream, StreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::TeacherConfig;
use crate::error::DuetError;
use crate::openai::sse::{DONE, event};
use sse::{SseEvent, SseSplitter};

/// Largest non-streamed answer accepted from the teacher.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A configured upstream, shared by all requests (one connection pool).
pub struct Teacher {
    client: reqwest::Client,
    /// The upstream's base URL, without a trailing slash.
    base_url: String,
    auth: Option<HeaderValue>,
    first_byte_timeout: Duration,
    chunk_timeout: Duration,
    retries: u32,
}

/// What the teacher answered, checked and ready to relay.
pub enum TeacherReply {
    /// A whole JSON body: a completion (2xx) or the teacher's own 4xx error.
    Body { status: StatusCode, body: Bytes },
    /// A stream whose first event has already arrived.
    Stream(TeacherStream),
}

impl Teacher {
    /// Builds the client; `api_key` comes from the variable named by `teacher.api_key_env`.
    pub fn new(config: &TeacherConfig, api_key: Option<String>) -> Result<Self, DuetError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| DuetError::Internal(format!("teacher client: {e}")))?;
        let auth = match api_key.filter(|k| !k.is_empty()) {
            None => None,
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    DuetError::Internal(format!(
                        "the teacher's API key (from {}) is not a valid header value",
                        config.api_key_env
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self {
            client,
            base_url: config.base_url.trim_end_matches('/').to_string(),
            auth,
            first_byte_timeout: Duration::from_millis(config.first_byte_timeout_ms),
            chunk_timeout: Duration::from_millis(config.chunk_timeout_ms),
            retries: config.retries,
        })
    }

    /// Sends a request to the upstream's `path` (`chat/completions`, `completions`),
    /// retrying what may succeed on a second try.
    pub async fn forward(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<TeacherReply, DuetError> {
        let url = format!("{}/{path}", self.base_url);
        let stream = body
            .get("stream")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let mut attempt = 0;
        loop {
            match self.attempt(&url, body, stream).await {
                Err(e) if e.is_transient_teacher_failure() && attempt < self.retries => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "teacher attempt failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }

    async fn attempt(
        &self,
        url: &str,
        body: &serde_json::Value,
        stream: bool,
    ) -> Result<TeacherReply, DuetError> {
        let deadline = Instant::now() + self.first_byte_timeout;
        let mut request = self.client.post(url).json(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = match timeout_at(deadline, request.send()).await {
            Err(_) => return Err(self.first_byte_timed_out()),
            Ok(Err(e)) if e.is_timeout() => return Err(self.first_byte_timed_out()),
            Ok(Err(e)) => return Err(DuetError::TeacherUnavailable(describe(&e))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        match status.as_u16() {
            401 | 403 => return Err(DuetError::TeacherRejectedKey(status.as_u16())),
            429 => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return Err(DuetError::TeacherRateLimited { retry_after });
            }
            500..=599 => {
                return Err(DuetError::TeacherUnavailable(format!(
                    "the teacher answered HTTP {status}"
                )));
            }
            200..=299 | 400..=499 => {}
            _ => {
                return Err(DuetError::TeacherUnavailable(format!(
                    "the teacher answered HTTP {status}"
                )));
            }
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_client_error() {
            let body = read_body(response, self.chunk_timeout).await?;
            return Ok(TeacherReply::Body {
                status,
                body: as_openai_error(status, body, &content_type),
            });
        }
        if stream {
            if !content_type.starts_with("text/event-stream") {
                return Err(wrong_type("text/event-stream", &content_type));
            }
            let mut relay = TeacherStream {
                upstream: response.bytes_stream().boxed(),
                splitter: SseSplitter::default(),
                ready: Vec::new(),
                chunk_timeout: self.chunk_timeout,
                finished: false,
            };
            // The first event arrives before anything is sent to the client, so a teacher
            // that accepts the request but never answers can still be replaced.
            while relay.ready.is_empty() {
                let next = timeout_at(deadline, relay.upstream.next())
                    .await
                    .map_err(|_| self.first_byte_timed_out())?;
                match next {
                    Some(Ok(bytes)) => {
                        relay.ready = relay
                            .splitter
                            .push(&bytes)
                            .map_err(|e| DuetError::TeacherUnavailable(e.to_string()))?
                    }
                    Some(Err(e)) => return Err(DuetError::TeacherUnavailable(describe(&e))),
                    None => {
                        return Err(DuetError::TeacherUnavailable(
                            "the teacher closed the stream before any event".into(),
                        ));
                    }
                }
            }
            relay.ready.reverse(); // popped from the back, in order
            Ok(TeacherReply::Stream(relay))
        } else {
            if !content_type.starts_with("application/json") {
                return Err(wrong_type("application/json", &content_type));
            }
            let body = timeout_at(deadline, read_body(response, self.chunk_timeout))
                .await
                .map_err(|_| self.first_byte_timed_out())??;
            Ok(TeacherReply::Body { status, body })
        }
    }

    fn first_byte_timed_out(&self) -> DuetError {
        DuetError::TeacherTimeout(format!(
            "the teacher sent nothing within {} ms (teacher.first_byte_timeout_ms)",
            self.first_byte_timeout.as_millis()
        ))
    }
}

/// A streamed answer being relayed: whole events only, ending with `[DONE]` whatever the
/// teacher does (a cut or malformed stream ends with an error event, then `[DONE]`).
pub struct TeacherStream {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    splitter: SseSplitter,
    /// Events received and not yet sent, last one first.
    ready: Vec<SseEvent>,
    chunk_timeout: Duration,
    finished: bool,
}

impl TeacherStream {
    /// The bytes to send the client, event by event as the teacher produces them.
    pub fn into_body(self) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
        futures::stream::unfold(self, |mut relay| async move {
            let bytes = relay.next_bytes().await?;
            Some((Ok(bytes), relay))
        })
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(event) = self.ready.pop() {
                if event.is_done {
                    self.finished = true;
                }
                return Some(event.raw);
            }
            let failure = match timeout(self.chunk_timeout, self.upstream.next()).await {
                Ok(Some(Ok(bytes))) => match self.splitter.push(&bytes) {
                    Ok(mut events) => {
                        events.reverse();
                        self.ready = events;
                        continue;
                    }
                    Err(e) => DuetError::TeacherUnavailable(e.to_string()),
                },
                Ok(Some(Err(e))) => DuetError::TeacherUnavailable(format!(
                    "the teacher's stream broke: {}",
                    describe(&e)
                )),
                Ok(None) if self.splitter.has_partial_event() => DuetError::TeacherUnavailable(
                    "the teacher's stream ended in the middle of an event".into(),
                ),
                Ok(None) => DuetError::TeacherUnavailable(
                    "the teacher's stream ended without [DONE]".into(),
                ),
                Err(_) => DuetError::TeacherTimeout(format!(
                    "the teacher's stream was silent for {} ms (teacher.chunk_timeout_ms)",
                    self.chunk_timeout.as_millis()
                )),
            };
            tracing::warn!(error = %failure, "teacher stream failed after it started");
            self.finished = true;
            let mut end = event(&failure.body()).to_vec();
            end.extend_from_slice(DONE);
            return Some(Bytes::from(end));
        }
    }
}

async fn read_body(
    response: reqwest::Response,
    chunk_timeout: Duration,
) -> Result<Bytes, DuetError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    loop {
        match timeout(chunk_timeout, chunks.next()).await {
            Err(_) => {
                return Err(DuetError::TeacherTimeout(
                    "the teacher stopped sending its answer".into(),
                ));
            }
            Ok(None) => return Ok(Bytes::from(body)),
            Ok(Some(Err(e))) => return Err(DuetError::TeacherUnavailable(describe(&e))),
            Ok(Some(Ok(bytes))) => {
                if body.len() + bytes.len() > MAX_BODY_BYTES {
                    return Err(DuetError::TeacherUnavailable(format!(
                        "the teacher's answer is larger than {MAX_BODY_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&bytes);
            }
        }
    }
}

/// The teacher's 4xx body if it is an OpenAI error; otherwise one made from its text.
fn as_openai_error(status: StatusCode, body: Bytes, content_type: &str) -> Bytes {
    let is_openai = content_type.starts_with("application/json")
        && serde_json::from_slice::<serde_json::Value>(&body)
            .is_ok_and(|v| v.get("error").is_some());
    if is_openai {
        return body;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    let error = DuetError::InvalidRequest {
        message: format!("the teacher answered HTTP {status}: {text}"),
        param: None,
    };
    Bytes::from(serde_json::to_vec(&error.body()).unwrap_or_default())
}

fn wrong_type(expected: &str, got: &str) -> DuetError {
    let got = if got.is_empty() { "none" } else { got };
    DuetError::TeacherUnavailable(format!(
        "the teacher answered with content type `{got}`, expected `{expected}`"
    ))
}

/// A transport error without the URL (which could carry credentials).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "cannot connect to the teacher"
    } else {
        "the teacher connection failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}
