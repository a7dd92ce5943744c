//! One request on the engine: its prompt's way through prefill (possibly starting from a
//! cached prefix), then token by token sampling, detokenizing, stop checks and streaming to
//! its client. The engine runs many of these in one forward pass.

use tokio::sync::{mpsc, oneshot};

use super::job::Job;
use super::sampler::Sampler;
use crate::admission::Reservation;
use crate::backend::{FinishReason, GenEvent, Outcome, Usage};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::student::cache::kv::KvCache;
use crate::student::cache::prefix::PromptCache;
use crate::student::load::LoadedModel;
use crate::student::model::Step;
use crate::student::text::detokenizer::Detokenizer;
use crate::student::text::stop::{StopMatcher, StopScan};

/// One request being generated: its tokens, its cache and where its text goes.
pub struct Sequence {
    /// The prompt, then each generated token once it is to be fed back.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading `tokens` already in `cache` (from the prompt cache or earlier passes).
    in_cache: usize,
    /// Prompt tokens that came from the prompt cache.
    reused: usize,
    cache: KvCache,
    max_tokens: usize,
    completion_tokens: u32,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopMatcher,
    /// Told the prompt's token count when prefill ends; `None` afterwards.
    started: Option<oneshot::Sender<Result<u32, DuetError>>>,
    events: mpsc::Sender<GenEvent>,
    /// Held until the sequence is dropped: its memory stays claimed while it runs.
    _reservation: Reservation,
}

impl Sequence {
    /// Tokenizes the job's conversation and prepares its cache, reusing the longest cached
    /// prefix; a request that cannot fit is answered here and ends.
    pub fn start(
        m: &LoadedModel,
        config: &StudentConfig,
        job: Job,
        mut reservation: Reservation,
        prompt_cache: &mut PromptCache,
    ) -> Result<Self, Outcome> {
        let Job {
            request,
            started,
            events,
            ..
        } = job;
        let (prompt, max_tokens) = match prepare(m, config, &request) {
            Ok(p) => p,
            Err(e) => {
                let _ = started.send(Err(e));
                return Err(Outcome::Failed);
            }
        };
        let total = prompt.len() + max_tokens;
        reservation.set_tokens(total as u64);
        let (mut cache, reused) = match prompt_cache.take(&prompt) {
            Some(hit) => (hit.cache, hit.reused),
            None => (m.model.shape.empty_cache(), 0),
        };
        // A cache taken from the prompt cache may be larger than this request was admitted
        // for: bring it to exactly what the reservation covers.
        cache.resize(total, reused > 0);
        if reused > 0 {
            tracing::debug!(
                reused,
                prompt = prompt.len(),
                "prompt prefix from the cache"
            );
        }
        Ok(Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            in_cache: reused,
            reused,
            cache,
            max_tokens,
            completion_tokens: 0,
            sampler: Sampler::new(request.sampling.clone()),
            detokenizer: Detokenizer::default(),
            stops: StopMatcher::new(request.stop.clone()),
            started: Some(started),
            events,
            _reservation: reservation,
        })
    }

    /// Whether the client went away (it stops waiting for the start, or for events).
    pub fn client_gone(&self) -> bool {
        match &self.started {
            Some(started) => started.is_closed(),
            None => self.events.is_closed(),
        }
    }

    /// Prompt tokens still to run before the first token can be sampled.
    pub fn prefill_left(&self) -> usize {
        self.tokens.len() - self.in_cache
    }

    /// This sequence's part of the next pass: at most `limit` of its waiting tokens.
    pub fn step(&mut self, limit: usize) -> Step<'_> {
        let end = self.tokens.len().min(self.in_cache + limit);
        Step {
            tokens: &self.tokens[self.in_cache..end],
            cache: &mut self.cache,
        }
    }

    /// Takes the logits of a pass that ran `ran` of this sequence's tokens: while the
    /// prompt is still being read there is nothing to do; otherwise samples, streams and
    /// decides whether to go on. `Some` when the sequence has ended.
    pub fn advance(&mut self, m: &LoadedModel, ran: usize, logits: &mut [f32]) -> Option<Outcome> {
        self.in_cache += ran;
        if self.in_cache < self.tokens.len() {
            return None;
        }
        if let Some(started) = self.started.take()
            && started.send(Ok(self.prompt_len as u32)).is_err()
        {
            return Some(Outcome::Cancelled);
        }
        let token = self.sampler.sample(logits);
        if m.end_tokens.contains(&token) {
            return Some(self.finish(FinishReason::Stop, false));
        }
        self.completion_tokens += 1;
        if !m.tokenizer.is_special(token) {
            let (text, stopped) = match self
                .stops
                .push(&self.detokenizer.push(m.tokenizer.bytes(token)))
            {
                StopScan::Emit(t) => (t, false),
                StopScan::Stopped(t) => (t, true),
            };
            if !self.send(text) {
                return Some(Outcome::Cancelled);
            }
            if stopped {
                return Some(self.finish(FinishReason::Stop, true));
            }
        }
        if self.completion_tokens as usize >= self.max_tokens {
            return Some(self.finish(FinishReason::Length, false));
        }
        self.tokens.push(token);
        None
    }

    /// Tells the client the pass failed.
    pub fn fail(&mut self, error: DuetError) -> Outcome {
        match self.started.take() {
            Some(started) => {
                let _ = started.send(Err(error));
            }
            None => {
                let _ = self.events.try_send(GenEvent::Error(error));
            }
        }
        Outcome::Failed
    }

    /// The tokens its cache holds, and the cache, for the prompt cache.
    pub fn into_cache(self) -> (Vec<u32>, KvCache) {
        let Self {
            mut tokens,
            in_cache,
            cache,
            ..
        } = self;
        tokens.truncate(in_cache);
        (tokens, cache)
    }

    fn finish(&mut self, reason: FinishReason, matched_stop_sequence: bool) -> Outcome {
        if !matched_stop_sequence {
            // Whatever was held back for a possible stop sequence is part of the answer.
            let rest = self.stops.finish();
            if !self.send(rest) {
                return Outcome::Cancelled;
            }
        }
        let done = GenEvent::Done {
            finish_reason: reason,
            usage: Usage::with_cached(
                self.prompt_len as u32,
                self.completion_tokens,
                self.reused as u32,
            ),
        };
        if self.events.try_send(done).is_err() {
            return Outcome::Cancelled;
        }
        Outcome::Completed
    }

    /// A failed send means the receiver is gone: the client disconnected. Sends never wait:
    /// the channel has room for every event of the request (see `Student::generate`).
    fn send(&self, text: String) -> bool {
        text.is_empty() || self.events.try_send(GenEvent::Text(text)).is_ok()
    }
}

/// The prompt's tokens and how many may be generated, or why the request cannot fit.
fn prepare(
    m: &LoadedModel,
    config: &StudentConfig,
    request: &crate::backend::GenerationRequest,
) -> Result<(Vec<u32>, usize), DuetError> {
    let prompt = m.prompt_tokens(&request.messages)?;
    if prompt.is_empty() {
        // Possible with a template that adds nothing around empty messages.
        return Err(DuetError::InvalidRequest {
            message: "the conversation renders to an empty prompt; send some text".into(),
            param: Some("messages".into()),
        });
    }
    let context = m.model.context();
    let room = context.saturating_sub(prompt.len());
    let max_tokens = match request.max_tokens {
        Some(n) if n > room || room == 0 => {
            return Err(DuetError::ContextLengthExceeded {
                context,
                prompt_tokens: prompt.len(),
                max_tokens: n,
            });
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(DuetError::ContextLengthExceeded {
                context,
                prompt_tokens: prompt.len(),
                max_tokens: 1,
            });
        }
        None => config.max_new_tokens.min(room),
    };
    Ok((prompt, max_tokens))
}
