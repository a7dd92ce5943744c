//! The engine thread: loads the student when the first job arrives, runs one job at a time
//! from a bounded queue, streams each job's tokens back through its own channel, and
//! unloads the model after `keep_alive` without work. Model work never runs on an HTTP
//! worker; a job whose receiver is gone stops at the next token.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::detokenizer::Detokenizer;
use super::loaded::LoadedModel;
use super::model::KvCache;
use super::sampler::Sampler;
use super::stop::{StopMatcher, StopScan};
use super::{LoadState, StudentStatus};
use crate::admission::{Admission, ModelFacts, Reservation};
use crate::backend::{FinishReason, GenEvent, GenerationRequest, Usage};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

/// A request waiting for the engine, with where its answer goes.
pub struct Job {
    pub request: GenerationRequest,
    /// The memory admission granted; returned when the job is dropped.
    pub reservation: Reservation,
    /// Resolved with the prompt's token count once prefill is done (or with the error).
    pub started: oneshot::Sender<Result<u32, DuetError>>,
    pub events: mpsc::Sender<GenEvent>,
}

/// Prompt tokens run through the model per forward pass; bounds the attention scores'
/// memory for long prompts.
const PREFILL_CHUNK: usize = 256;

/// What the engine needs besides its jobs.
pub struct EngineSettings {
    pub student: StudentConfig,
    pub budget: u64,
    pub keep_alive: KeepAlive,
}

/// Starts the engine thread and returns the sending half of its bounded job queue.
pub fn spawn(
    settings: EngineSettings,
    status: Arc<Mutex<StudentStatus>>,
    admission: Arc<Admission>,
) -> SyncSender<Job> {
    let (tx, rx) = sync_channel(settings.student.queue_size);
    let keep_alive = settings.keep_alive;
    let engine = Engine {
        settings,
        status,
        admission,
        loaded: None,
        keep_alive,
    };
    std::thread::Builder::new()
        .name("duet-engine".into())
        .spawn(move || engine.run(rx))
        .expect("spawn the engine thread");
    tx
}

struct Engine {
    settings: EngineSettings,
    status: Arc<Mutex<StudentStatus>>,
    admission: Arc<Admission>,
    loaded: Option<LoadedModel>,
    /// How long to stay loaded without work (the last request's `keep_alive` or the default).
    keep_alive: KeepAlive,
}

impl Engine {
    /// Serves jobs until every `Student` handle is dropped.
    fn run(mut self, jobs: Receiver<Job>) {
        while let Some(job) = self.next_job(&jobs) {
            if job.started.is_closed() {
                continue; // the client left while queued
            }
            let keep_alive = job.request.keep_alive.unwrap_or(self.settings.keep_alive);
            if self.loaded.is_none() {
                self.load();
            }
            let outcome = match &self.loaded {
                Some(model) => serve(model, &self.settings.student, job),
                None => {
                    let reason = self.failed_reason().unwrap_or_default();
                    let _ = job.started.send(Err(DuetError::ModelLoad(reason)));
                    Outcome::Failed
                }
            };
            let mut status = self.status.lock().expect("status lock");
            match outcome {
                Outcome::Completed => status.completed += 1,
                Outcome::Cancelled => status.cancelled += 1,
                Outcome::Failed => {}
            }
            drop(status);
            self.keep_alive = keep_alive;
        }
    }

    /// The next job; while loaded and idle past `keep_alive`, unloads first.
    fn next_job(&mut self, jobs: &Receiver<Job>) -> Option<Job> {
        loop {
            let idle_limit = match (&self.loaded, self.keep_alive) {
                (Some(_), KeepAlive::For(limit)) => limit,
                _ => return jobs.recv().ok(),
            };
            match jobs.recv_timeout(idle_limit) {
                Ok(job) => return Some(job),
                Err(RecvTimeoutError::Timeout) => self.unload(),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn failed_reason(&self) -> Option<String> {
        match &self.status.lock().expect("status lock").state {
            LoadState::Failed { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    fn load(&mut self) {
        if self.failed_reason().is_some() {
            return; // a model that failed once is not re-read for every request
        }
        self.status.lock().expect("status lock").state = LoadState::Loading;
        let started = Instant::now();
        let result = LoadedModel::load(&self.settings.student, self.settings.budget);
        crate::memory::release_free_memory();
        let mut status = self.status.lock().expect("status lock");
        match result {
            Ok(model) => {
                let load_seconds = started.elapsed().as_secs_f64();
                let measured = crate::memory::rss_bytes();
                let f = model.footprint;
                // Admission counts the estimate: it is what the budget check promised, and
                // the measured RSS would also count whatever else shares this process.
                self.admission.learn(ModelFacts {
                    fixed_bytes: f.fixed_bytes(),
                    kv_bytes_per_token: f.kv_bytes_per_token,
                    context_length: f.context_length,
                });
                tracing::info!(
                    model = %status.model,
                    load_seconds,
                    estimated = %crate::memory::human(f.fixed_bytes()),
                    measured_rss = %crate::memory::human(measured),
                    "student loaded"
                );
                status.loads += 1;
                status.state = LoadState::Ready {
                    load_seconds,
                    weight_bytes: f.weight_bytes,
                    estimated_bytes: f.fixed_bytes(),
                    measured_rss_bytes: measured,
                    context_length: f.context_length as usize,
                    kv_bytes_per_token: f.kv_bytes_per_token as usize,
                };
                self.loaded = Some(model);
            }
            Err(e) => {
                let reason = match e {
                    DuetError::ModelLoad(reason) => reason,
                    other => other.to_string(),
                };
                tracing::error!(%reason, "student failed to load");
                status.state = LoadState::Failed { reason };
            }
        }
    }

    /// Drops the model and hands its memory back to the operating system.
    fn unload(&mut self) {
        self.loaded = None;
        crate::memory::release_free_memory();
        crate::memory::release_code_pages();
        tracing::info!(rss = %crate::memory::human(crate::memory::rss_bytes()), "student unloaded after keep_alive");
        self.status.lock().expect("status lock").state = LoadState::Unloaded;
    }
}

/// How a job ended, for the counters in `/health`.
#[derive(Debug, PartialEq)]
enum Outcome {
    Completed,
    /// The client went away; generation stopped at the next token.
    Cancelled,
    /// The request could not be served (refused or failed); the client was told why.
    Failed,
}

/// Runs one job to its end: prefill, then sample/detokenize/stop-check per token.
fn serve(m: &LoadedModel, config: &StudentConfig, job: Job) -> Outcome {
    let Job {
        request,
        mut reservation,
        started,
        events,
    } = job;
    let (prompt, max_tokens) = match prepare(m, config, &request) {
        Ok(p) => p,
        Err(e) => {
            let _ = started.send(Err(e));
            return Outcome::Failed;
        }
    };
    reservation.set_tokens((prompt.len() + max_tokens) as u64);
    let mut cache = KvCache::new(m.model.shape.layers);
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        if started.is_closed() {
            return Outcome::Cancelled;
        }
        match m.model.forward(chunk, &mut cache) {
            Ok(l) => logits = l,
            Err(e) => {
                let _ = started.send(Err(DuetError::Internal(format!("prefill: {e}"))));
                return Outcome::Failed;
            }
        }
    }
    let prompt_tokens = prompt.len() as u32;
    if started.send(Ok(prompt_tokens)).is_err() {
        return Outcome::Cancelled;
    }

    let mut sampler = Sampler::new(request.sampling.clone());
    let mut detokenizer = Detokenizer::default();
    let mut stops = StopMatcher::new(request.stop.clone());
    let mut completion_tokens = 0u32;
    // A failed send means the receiver is gone: the client disconnected.
    let send = |text: String| text.is_empty() || events.blocking_send(GenEvent::Text(text)).is_ok();
    let mut matched_stop_sequence = false;
    let finish_reason = loop {
        let token = sampler.sample(&mut logits);
        if m.end_tokens.contains(&token) {
            break FinishReason::Stop;
        }
        completion_tokens += 1;
        if !m.tokenizer.is_special(token) {
            let (text, stopped) = match stops.push(&detokenizer.push(m.tokenizer.bytes(token))) {
                StopScan::Emit(t) => (t, false),
                StopScan::Stopped(t) => (t, true),
            };
            if !send(text) {
                return Outcome::Cancelled;
            }
            if stopped {
                matched_stop_sequence = true;
                break FinishReason::Stop;
            }
        }
        if completion_tokens as usize >= max_tokens {
            break FinishReason::Length;
        }
        if events.is_closed() {
            return Outcome::Cancelled;
        }
        match m.model.forward(&[token], &mut cache) {
            Ok(l) => logits = l,
            Err(e) => {
                let _ = events
                    .blocking_send(GenEvent::Error(DuetError::Internal(format!("decode: {e}"))));
                return Outcome::Failed;
            }
        }
    };
    if !matched_stop_sequence {
        // Whatever was held back for a possible stop sequence is part of the answer.
        let rest = stops.finish();
        if !send(rest) {
            return Outcome::Cancelled;
        }
    }
    let done = GenEvent::Done {
        finish_reason,
        usage: Usage::new(prompt_tokens, completion_tokens),
    };
    if events.blocking_send(done).is_err() {
        return Outcome::Cancelled;
    }
    Outcome::Completed
}

/// The prompt's tokens and how many may be generated, or why the request cannot fit.
fn prepare(
    m: &LoadedModel,
    config: &StudentConfig,
    request: &GenerationRequest,
) -> Result<(Vec<u32>, usize), DuetError> {
    let prompt = m.prompt_tokens(&request.messages)?;
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
