//! One request on the engine: its prompt's way through prefill (possibly starting from a
//! cached prefix), then token by token sampling, detokenizing, stop checks and streaming to
//! its client. The engine runs many of these in one forward pass.

use tokio::sync::{mpsc, oneshot};

use std::time::{Duration, Instant};

use super::job::Job;
use super::logprobs::LogprobScratch;
use super::sampler::Sampler;
use crate::admission::Reservation;
use crate::backend::Prompt;
use crate::backend::{
    FinishReason, GenEvent, GenerationRequest, Grammar, Outcome, PromptRead, TokenLogprob, Usage,
};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::student::cache::kv::KvCache;
use crate::student::cache::prefix::PromptCache;
use crate::student::grammar::{self, Guide};
use crate::student::load::LoadedModel;
use crate::student::model::Step;
use crate::student::text::detokenizer::Detokenizer;
use crate::student::text::middle::MiddleGuard;
use crate::student::text::stop::StopMatcher;

/// One request being generated: its tokens, its cache and where its text goes.
pub struct Sequence {
    /// The prompt, then each generated token once it is to be fed back.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Whether the prompt was cut to fit (fill-in-the-middle).
    truncated: bool,
    /// Leading `tokens` already in `cache` (from the prompt cache or earlier passes).
    in_cache: usize,
    /// Prompt tokens that came from the prompt cache.
    reused: usize,
    cache: KvCache,
    max_tokens: usize,
    completion_tokens: u32,
    /// Generated tokens already accounted for in a text event.
    tokens_sent: u32,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopMatcher,
    /// Ends a fill-in-the-middle completion where the middle ends.
    middle: Option<MiddleGuard>,
    /// Holds the output to the request's grammar.
    guide: Option<Guide>,
    /// Special tokens are part of the text (a tool call's `<tool_call>`, for its parser).
    special_text: bool,
    /// Alternatives to report per token, when log probabilities were asked for.
    logprobs: Option<usize>,
    logprob_scratch: LogprobScratch,
    /// Log probabilities of tokens whose text has not been sent yet.
    pending_logprobs: Vec<TokenLogprob>,
    echo: bool,
    /// Generation stops this long after the first token, and when that was.
    time_limit: Option<Duration>,
    first_token_at: Option<Instant>,
    /// Told the prompt's token count when prefill ends; `None` afterwards.
    started: Option<oneshot::Sender<Result<PromptRead, DuetError>>>,
    events: mpsc::Sender<GenEvent>,
    /// Held until the sequence is dropped: its memory stays claimed while it runs.
    _reservation: Reservation,
}

impl Sequence {
    /// Tokenizes the job's prompt and prepares its cache, reusing the longest cached
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
        let (prompt, truncated, max_tokens) = match prepare(m, config, &request) {
            Ok(p) => p,
            Err(e) => {
                let _ = started.send(Err(e));
                return Err(Outcome::Failed);
            }
        };
        let guide = match guide(m, &request) {
            Ok(guide) => guide,
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
            truncated,
            in_cache: reused,
            reused,
            cache,
            max_tokens,
            completion_tokens: 0,
            tokens_sent: 0,
            sampler: Sampler::new(request.sampling.clone(), &m.sampling),
            detokenizer: Detokenizer::default(),
            stops: StopMatcher::new(request.stop.clone()),
            middle: match &request.prompt {
                Prompt::Infill(infill) => Some(MiddleGuard::new(
                    &format!("{}{}", infill.prefix, infill.prompt),
                    &infill.suffix,
                    infill.indent,
                )),
                _ => None,
            },
            guide,
            special_text: request.tools.is_some(),
            logprobs: request.logprobs,
            logprob_scratch: LogprobScratch::default(),
            pending_logprobs: Vec::new(),
            echo: request.echo,
            time_limit: request.time_limit,
            first_token_at: None,
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
        if let Some(started) = self.started.take() {
            let read = PromptRead {
                tokens: self.prompt_len as u32,
                truncated: self.truncated,
            };
            if started.send(Ok(read)).is_err() {
                return Some(Outcome::Cancelled);
            }
            if self.echo {
                let text: Vec<u8> = self.tokens[..self.prompt_len]
                    .iter()
                    .flat_map(|&t| m.tokenizer.bytes(t).iter().copied())
                    .collect();
                if !self.send(String::from_utf8_lossy(&text).into_owned()) {
                    return Some(Outcome::Cancelled);
                }
            }
            if self.max_tokens == 0 {
                // Read the prompt only (kept in the prompt cache): an IDE's warm-up call.
                return Some(self.finish(FinishReason::Length, false));
            }
        }
        self.sampler.apply_bias(logits);
        if self.logprobs.is_some() {
            self.logprob_scratch.keep(logits);
        }
        self.sampler.apply_penalties(logits);
        let mut token = self.sampler.choose(logits);
        if let Some(guide) = &mut self.guide {
            // Drawn first and checked: the mask over the whole vocabulary is computed only
            // when the grammar refuses the token.
            let checked = match guide.allows(token) {
                Ok(true) => Ok(token),
                Ok(false) => guide.mask(logits).map(|()| self.sampler.choose(logits)),
                Err(e) => Err(e),
            };
            token = match checked {
                Ok(token) => token,
                Err(e) => return Some(self.fail_grammar(e)),
            };
        }
        self.sampler.record(token);
        if m.end_tokens.contains(&token) {
            return Some(self.finish(FinishReason::Stop, false));
        }
        if let Some(Err(e)) = self.guide.as_mut().map(|g| g.accept(token)) {
            return Some(self.fail_grammar(e));
        }
        self.completion_tokens += 1;
        let first_token_at = *self.first_token_at.get_or_insert_with(Instant::now);
        if self.special_text || !m.tokenizer.is_special(token) {
            if let Some(alternatives) = self.logprobs {
                let entry = self
                    .logprob_scratch
                    .entry(token, alternatives, &m.tokenizer);
                self.pending_logprobs.push(entry);
            }
            let (mut text, mut stopped) = self
                .stops
                .push(&self.detokenizer.push(m.tokenizer.bytes(token)))
                .into_parts();
            if let Some(middle) = &mut self.middle {
                let (kept, ended) = middle.push(&text).into_parts();
                text = kept;
                if stopped && !ended {
                    // A stop sequence ended the middle: the line it was on is part of it.
                    text += &middle.finish();
                }
                stopped |= ended;
            }
            if !self.send(text) {
                return Some(Outcome::Cancelled);
            }
            if stopped {
                return Some(self.finish(FinishReason::Stop, true));
            }
        }
        if self.guide.as_ref().is_some_and(Guide::is_complete) {
            // Nothing but the end of the turn may follow: no need to run the model for it.
            return Some(self.finish(FinishReason::Stop, false));
        }
        let out_of_time = self
            .time_limit
            .is_some_and(|limit| first_token_at.elapsed() >= limit);
        if self.completion_tokens as usize >= self.max_tokens || out_of_time {
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

    /// Ends the request on a grammar that failed while generating (it grew past
    /// llguidance's limits): the client gets an error, the engine goes on.
    fn fail_grammar(&mut self, error: String) -> Outcome {
        tracing::warn!(%error, "grammar failed while generating");
        self.fail(DuetError::Internal(format!(
            "the output's grammar failed: {error}"
        )))
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
        if matched_stop_sequence {
            // The tokens of the stop sequence are not part of the answer.
            self.pending_logprobs.clear();
        } else {
            // Whatever was held back for a possible stop sequence is part of the answer.
            let mut rest = self.stops.finish();
            if let Some(middle) = &mut self.middle {
                rest = match middle.push(&rest).into_parts() {
                    (t, false) => t + &middle.finish(),
                    (t, true) => t,
                };
            }
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

    /// Sends new text with the log probabilities of the tokens it came from. A failed send
    /// means the receiver is gone: the client disconnected. Sends never wait: the channel
    /// has room for every event of the request (see `Student::generate`).
    fn send(&mut self, text: String) -> bool {
        if text.is_empty() {
            return true;
        }
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let tokens = self.completion_tokens - self.tokens_sent;
        self.tokens_sent = self.completion_tokens;
        self.events
            .try_send(GenEvent::Text {
                text,
                tokens,
                logprobs,
            })
            .is_ok()
    }
}

/// A guide for the request's grammar or tools, or a 400 saying why they cannot be followed.
fn guide(m: &LoadedModel, request: &GenerationRequest) -> Result<Option<Guide>, DuetError> {
    let (grammar, param) = match (&request.grammar, &request.tools) {
        (Some(Grammar::Json(schema)), _) => {
            (grammar::json_schema(schema.clone()), "response_format")
        }
        (None, Some(tools)) => (grammar::tools::grammar(tools, has_tool_tokens(m)), "tools"),
        (None, None) => return Ok(None),
    };
    m.grammars
        .guide(&m.tokenizer, m.model.shape.vocab, grammar, param)
        .map(Some)
}

/// Whether the model writes tool calls with tokens of its own (Qwen2.5).
fn has_tool_tokens(m: &LoadedModel) -> bool {
    m.tokenizer.special_id("<tool_call>").is_some()
        && m.tokenizer.special_id("</tool_call>").is_some()
}

/// The prompt's tokens (and whether they were cut to fit) and how many tokens may be
/// generated, or why the request cannot fit.
fn prepare(
    m: &LoadedModel,
    config: &StudentConfig,
    request: &GenerationRequest,
) -> Result<(Vec<u32>, bool, usize), DuetError> {
    let context = m.model.context();
    let vocab = m.model.shape.vocab;
    if let Some(&(bad, _)) = request
        .sampling
        .logit_bias
        .iter()
        .find(|&&(id, _)| id as usize >= vocab)
    {
        return Err(DuetError::invalid(
            "logit_bias",
            format!("token id {bad} is not in this model's vocabulary of {vocab}"),
        ));
    }
    // A fill-in-the-middle prompt cut to fit keeps the same room for the answer whatever
    // the request's max_tokens, so an IDE's warm-up call (max_tokens 0) lays out the very
    // prompt its completions will: they find it in the prompt cache.
    let answer_room = config.max_new_tokens.min(context / 2);
    let (prompt, truncated) = m.prompt_tokens(
        &request.prompt,
        request.tools.as_ref(),
        context.saturating_sub(answer_room),
    )?;
    if prompt.is_empty() {
        // Possible with a template that adds nothing around empty messages.
        let param = match request.prompt {
            Prompt::Chat(_) => "messages",
            _ => "prompt",
        };
        return Err(DuetError::invalid(
            param,
            "the request renders to an empty prompt; send some text",
        ));
    }
    let room = context.saturating_sub(prompt.len());
    let max_tokens = match request.max_tokens {
        Some(n) if n > room || (room == 0 && n > 0) => {
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
    Ok((prompt, truncated, max_tokens))
}
