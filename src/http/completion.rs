//! A student generation rendered as an OpenAI chat completion: one JSON body, or a
//! Server-Sent Events stream (role chunk, content deltas, finish chunk, usage chunk when
//! asked for, `[DONE]`) with keep-alive comments while it is quiet.

use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::web::Bytes;
use futures::stream;

use super::shutdown::{ShutdownSignal, until_shutdown};
use crate::backend::{FinishReason, GenEvent, Generation, Usage};
use crate::error::DuetError;
use crate::openai::sse;
use crate::openai::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta,
};

/// A quiet stream gets a comment line this often so proxies and clients keep it open.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// Called once with the number of tokens generated (rate limits, metrics).
pub type TokenMeter = Box<dyn FnOnce(u32) + Send>;

/// Fields shared by every chunk of one completion.
pub struct CompletionMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl CompletionMeta {
    /// A chunk carrying one choice's delta; `usage: null` on it when usage was asked for.
    fn chunk(
        &self,
        delta: Delta<'_>,
        finish_reason: Option<FinishReason>,
        include_usage: bool,
    ) -> Bytes {
        let choice = ChunkChoice {
            index: 0,
            delta,
            finish_reason,
            logprobs: None,
        };
        self.event(vec![choice], include_usage.then_some(None))
    }

    /// The chunk before `[DONE]` that carries usage and no choices.
    fn usage_chunk(&self, usage: Usage) -> Bytes {
        self.event(vec![], Some(Some(usage)))
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
}

pub async fn whole_response(
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

pub fn stream_response(
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
