//! A student's generations rendered for a client: collected into one JSON body, or streamed
//! as Server-Sent Events with keep-alive comments while it is quiet. What the JSON and the
//! events look like is the API's [`Shape`] (chat completion, text completion, llama.cpp's
//! completion); this file is the part they share: one or several generations (one per
//! prompt of a batch), their text and log probabilities, how they end, usage, errors.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::web::Bytes;
use futures::{FutureExt, StreamExt, stream};

use super::shutdown::{ShutdownSignal, until_shutdown};
use crate::backend::{FinishReason, GenEvent, Generation, TokenLogprob, Usage};
use crate::error::DuetError;
use crate::openai::sse;

/// A quiet stream gets a comment line this often so proxies and clients keep it open.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// Called once with the number of tokens generated (rate limits, metrics).
pub type TokenMeter = Box<dyn FnOnce(u32) + Send>;

/// Charges an answer's tokens exactly once: the final count when it completes, and what
/// was generated so far when it ends early (the client left, an error), so leaving just
/// before the end does not dodge a token limit.
struct Charge {
    meter: Option<TokenMeter>,
    so_far: Arc<AtomicU32>,
}

impl Charge {
    fn new(meter: TokenMeter) -> Self {
        Self {
            meter: Some(meter),
            so_far: Arc::default(),
        }
    }

    /// The answer completed with `tokens` generated.
    fn settle(&mut self, tokens: u32) {
        if let Some(meter) = self.meter.take() {
            meter(tokens);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let so_far = self.so_far.load(Ordering::Relaxed);
        self.settle(so_far);
    }
}

/// One generation, finished.
#[derive(Debug, Default)]
pub struct Finished {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Where each token of `logprobs` starts in `text`, in characters.
    pub text_offsets: Vec<usize>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
}

/// How one API shapes generations; `index` is the choice (one per prompt).
pub trait Shape: Send + Sync + 'static {
    /// The whole answer as one JSON body; `usage` sums every choice's.
    fn whole(&self, choices: Vec<Finished>, usage: Usage) -> serde_json::Value;
    /// The event that opens choice `index`, sent before its first text (chat's role delta).
    fn opening(&self, _index: u32) -> Option<Bytes> {
        None
    }
    /// New text of choice `index`.
    fn piece(&self, index: u32, text: &str, logprobs: &[TokenLogprob]) -> Bytes;
    /// The event that ends choice `index`.
    fn finished(&self, index: u32, reason: FinishReason, usage: &Usage) -> Bytes;
    /// What follows the last choice's end (a usage chunk when asked for, `[DONE]`).
    fn closing(&self, usage: Usage) -> Vec<Bytes>;
    /// What an error after the stream started becomes.
    fn error(&self, error: &DuetError) -> Vec<Bytes> {
        vec![sse::event(&error.body()), Bytes::from_static(sse::DONE)]
    }
}

/// The answer to a request: a stream of events when it asked for one, else one JSON body.
pub async fn respond(
    generations: Vec<Generation>,
    shape: Arc<dyn Shape>,
    stream: bool,
    meter: TokenMeter,
    shutdown: ShutdownSignal,
) -> Result<HttpResponse, DuetError> {
    if stream {
        Ok(stream_response(generations, shape, meter, shutdown))
    } else {
        whole_response(generations, shape, meter).await
    }
}

/// Waits for every generation to finish and answers with the shape's JSON body.
pub async fn whole_response(
    generations: Vec<Generation>,
    shape: Arc<dyn Shape>,
    meter: TokenMeter,
) -> Result<HttpResponse, DuetError> {
    let mut charge = Charge::new(meter);
    // The first failure answers at once; the other choices' generations stop with it.
    let finished = futures::future::try_join_all(
        generations
            .into_iter()
            .map(|g| collect(g, charge.so_far.clone())),
    )
    .await?;
    let usage = total_usage(finished.iter().map(|f| &f.usage));
    charge.settle(usage.completion_tokens);
    Ok(HttpResponse::Ok().json(shape.whole(finished, usage)))
}

async fn collect(
    mut generation: Generation,
    so_far: Arc<AtomicU32>,
) -> Result<Finished, DuetError> {
    let mut finished = Finished::default();
    loop {
        match generation.events.recv().await {
            Some(GenEvent::Text {
                text,
                tokens,
                logprobs,
            }) => {
                so_far.fetch_add(tokens, Ordering::Relaxed);
                let start = finished.text.chars().count();
                finished
                    .text_offsets
                    .extend(token_offsets(start, &logprobs));
                finished.text.push_str(&text);
                finished.logprobs.extend(logprobs);
            }
            Some(GenEvent::Done {
                finish_reason,
                usage,
            }) => {
                finished.finish_reason = Some(finish_reason);
                finished.usage = usage;
                return Ok(finished);
            }
            Some(GenEvent::Error(e)) => return Err(e),
            None => return Err(unfinished()),
        }
    }
}

/// Where each token starts, in characters, for tokens whose text begins at `start`.
pub fn token_offsets(start: usize, tokens: &[TokenLogprob]) -> Vec<usize> {
    tokens
        .iter()
        .scan(start, |at, t| {
            let here = *at;
            *at += t.token.text.chars().count();
            Some(here)
        })
        .collect()
}

fn unfinished() -> DuetError {
    DuetError::Internal("generation ended without finishing".into())
}

/// Usage of several choices together (cached tokens summed too).
fn total_usage<'a>(usages: impl Iterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage::new(0, 0);
    let mut cached = None;
    for u in usages {
        total = Usage::new(
            total.prompt_tokens + u.prompt_tokens,
            total.completion_tokens + u.completion_tokens,
        );
        if let Some(details) = u.prompt_tokens_details {
            *cached.get_or_insert(0) += details.cached_tokens;
        }
    }
    match cached {
        Some(c) => Usage::with_cached(total.prompt_tokens, total.completion_tokens, c),
        None => total,
    }
}

/// Where a stream is.
struct Streaming {
    events: stream::SelectAll<stream::BoxStream<'static, (u32, GenEvent)>>,
    shape: Arc<dyn Shape>,
    /// Events rendered and not yet sent.
    queue: VecDeque<Bytes>,
    opened: Vec<bool>,
    done: Vec<bool>,
    usages: Vec<Usage>,
    charge: Charge,
    over: bool,
}

impl Streaming {
    /// Renders the next event into the queue; `false` once nothing more will come.
    async fn advance(&mut self) -> bool {
        if self.over {
            return false;
        }
        let event = match tokio::time::timeout(KEEP_ALIVE_EVERY, self.events.next()).await {
            Err(_) => {
                self.queue.push_back(Bytes::from_static(sse::KEEP_ALIVE));
                return true;
            }
            Ok(event) => event,
        };
        match event {
            Some((
                index,
                GenEvent::Text {
                    text,
                    tokens,
                    logprobs,
                },
            )) => {
                self.charge.so_far.fetch_add(tokens, Ordering::Relaxed);
                self.open(index);
                let piece = self.shape.piece(index, &text, &logprobs);
                self.queue.push_back(piece);
            }
            Some((
                index,
                GenEvent::Done {
                    finish_reason,
                    usage,
                },
            )) => {
                self.open(index);
                let end = self.shape.finished(index, finish_reason, &usage);
                self.queue.push_back(end);
                let i = index as usize;
                self.done[i] = true;
                self.usages[i] = usage;
                if self.done.iter().all(|&d| d) {
                    self.close();
                }
            }
            Some((_, GenEvent::Error(e))) => self.fail(&e),
            None => self.fail(&unfinished()),
        }
        true
    }

    fn open(&mut self, index: u32) {
        let opened = &mut self.opened[index as usize];
        if !*opened {
            *opened = true;
            self.queue.extend(self.shape.opening(index));
        }
    }

    fn close(&mut self) {
        let usage = total_usage(self.usages.iter());
        self.charge.settle(usage.completion_tokens);
        self.queue.extend(self.shape.closing(usage));
        self.over = true;
    }

    fn fail(&mut self, error: &DuetError) {
        self.queue.extend(self.shape.error(error));
        self.over = true;
    }
}

impl Drop for Streaming {
    /// The client left or the stream failed: tokens generated but not yet sent are charged
    /// too (the generations stop once the receivers are gone).
    fn drop(&mut self) {
        while let Some(Some((_, event))) = self.events.next().now_or_never() {
            if let GenEvent::Text { tokens, .. } = event {
                self.charge.so_far.fetch_add(tokens, Ordering::Relaxed);
            }
        }
    }
}

/// Streams every generation's events as the shape renders them, interleaved as they come.
pub fn stream_response(
    generations: Vec<Generation>,
    shape: Arc<dyn Shape>,
    meter: TokenMeter,
    shutdown: ShutdownSignal,
) -> HttpResponse {
    let count = generations.len();
    let events = stream::select_all(generations.into_iter().enumerate().map(|(i, g)| {
        stream::unfold(g.events, |mut events| async move {
            events.recv().await.map(|e| (e, events))
        })
        .map(move |e| (i as u32, e))
        .boxed()
    }));
    let mut state = Streaming {
        events,
        shape,
        queue: VecDeque::new(),
        opened: vec![false; count],
        done: vec![false; count],
        usages: vec![Usage::default(); count],
        charge: Charge::new(meter),
        over: false,
    };
    for index in 0..count as u32 {
        state.open(index);
    }
    // Dropping this stream (the client went away) drops the event receivers, which stops
    // the generations at their next token.
    let body = stream::unfold(state, |mut state| async move {
        loop {
            if let Some(bytes) = state.queue.pop_front() {
                return Some((Ok::<_, actix_web::Error>(bytes), state));
            }
            if !state.advance().await {
                return None;
            }
        }
    });
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .streaming(until_shutdown(body, shutdown))
}
