//! The engine thread: loads the student when the first job arrives, takes jobs from a
//! bounded queue, and runs every active sequence together (continuous batching): each
//! forward pass carries one new token of every decoding sequence plus a slice of at most one
//! prompt being read, so a long prompt never stalls the streams already running. Unloads
//! the model after `keep_alive` without work. Model work never runs on an HTTP worker; a
//! sequence whose client is gone stops at the next pass.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::loaded::LoadedModel;
use super::prompt_cache::PromptCache;
use super::sequence::{Outcome, Sequence};
use super::{LoadState, StudentStatus};
use crate::admission::{Admission, ModelFacts, QueuedReservation};
use crate::backend::{GenEvent, GenerationRequest};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

/// A request waiting for the engine, with where its answer goes.
pub struct Job {
    pub request: GenerationRequest,
    /// The memory admission granted: the engine claims it when the job starts; a client that
    /// leaves before that gives it back at once.
    pub reservation: QueuedReservation,
    /// Resolved with the prompt's token count once prefill is done (or with the error).
    pub started: oneshot::Sender<Result<u32, DuetError>>,
    pub events: mpsc::Sender<GenEvent>,
}

/// Prompt tokens run through the model per forward pass; bounds the attention scores'
/// memory for long prompts and how long one pass delays the decoding sequences.
pub const PREFILL_CHUNK: usize = 256;

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
        active: Vec::new(),
        logits: Vec::new(),
        ran: Vec::new(),
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
    /// The model and the prompt cache that belongs to it.
    loaded: Option<(LoadedModel, PromptCache)>,
    /// How long to stay loaded without work (the last request's `keep_alive` or the default).
    keep_alive: KeepAlive,
    /// Sequences being generated, in arrival order.
    active: Vec<Sequence>,
    /// The last pass's logits, one row per sequence that ran, and how many tokens each
    /// active sequence ran (both reused from pass to pass).
    logits: Vec<f32>,
    ran: Vec<usize>,
}

impl Engine {
    /// Serves jobs until every `Student` handle is dropped and the last sequence ends.
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.active.is_empty() {
                match self.next_job(&jobs) {
                    Some(job) => self.begin(job),
                    None => return,
                }
            }
            // Whatever else is waiting joins the batch at once.
            while self.active.len() < self.settings.student.parallel {
                match jobs.try_recv() {
                    Ok(job) => self.begin(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.active.is_empty() {
                self.pass();
            }
        }
    }

    /// Turns a job into an active sequence (loading the model first if needed), or answers
    /// it at once when it cannot run.
    fn begin(&mut self, job: Job) {
        // The request that evicted cached prefixes may be this one: free them before it runs.
        if let Some((_, prompt_cache)) = &mut self.loaded {
            prompt_cache.drop_evicted();
        }
        if job.started.is_closed() {
            return; // the client left while queued
        }
        let Some(reservation) = job.reservation.claim() else {
            return; // the client left (and gave the memory back) while queued
        };
        self.keep_alive = job.request.keep_alive.unwrap_or(self.settings.keep_alive);
        if self.loaded.is_none() {
            self.load();
        }
        let Some((model, prompt_cache)) = &mut self.loaded else {
            let reason = self.failed_reason().unwrap_or_default();
            let _ = job.started.send(Err(DuetError::ModelLoad(reason)));
            return;
        };
        match Sequence::start(
            model,
            &self.settings.student,
            job,
            reservation,
            prompt_cache,
        ) {
            Ok(sequence) => self.active.push(sequence),
            Err(outcome) => count(&self.status, outcome),
        }
    }

    /// One forward pass over the active sequences: a token for each decoding one and up to
    /// `PREFILL_CHUNK` prompt tokens, given to the earliest sequences still reading theirs.
    fn pass(&mut self) {
        let Some((model, prompt_cache)) = &mut self.loaded else {
            return;
        };
        let mut ended = Vec::new();
        let mut index = 0;
        while index < self.active.len() {
            if self.active[index].client_gone() {
                ended.push((self.active.remove(index), Outcome::Cancelled));
            } else {
                index += 1;
            }
        }
        let mut prefill_room = PREFILL_CHUNK;
        let ran = &mut self.ran;
        ran.clear();
        let mut steps = Vec::with_capacity(self.active.len());
        for sequence in &mut self.active {
            let n = match sequence.prefill_left() {
                1 => 1, // a decoding sequence's next token, or a prompt's last one
                left => {
                    let n = left.min(prefill_room);
                    prefill_room -= n;
                    n
                }
            };
            ran.push(n);
            if n > 0 {
                steps.push(sequence.step(n));
            }
        }
        let logits = &mut self.logits;
        let result = if steps.is_empty() {
            Ok(())
        } else {
            model.model.forward_batch(&mut steps, logits)
        };
        drop(steps);
        match result {
            Ok(()) => {
                let mut rows = logits.chunks_exact_mut(model.model.shape.vocab);
                let mut index = 0;
                for &n in ran.iter() {
                    let outcome = if n == 0 {
                        None
                    } else {
                        let l = rows.next().expect("logits for every sequence that ran");
                        self.active[index].advance(model, n, l)
                    };
                    match outcome {
                        Some(outcome) => ended.push((self.active.remove(index), outcome)),
                        None => index += 1,
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for mut sequence in self.active.drain(..) {
                    let outcome = sequence.fail(DuetError::Internal(format!("generation: {e}")));
                    ended.push((sequence, outcome));
                }
            }
        }
        // Counted first: a client that got its last event may read /health right away.
        for (_, outcome) in &ended {
            count(&self.status, *outcome);
        }
        for (sequence, outcome) in ended {
            if outcome != Outcome::Failed {
                let (tokens, cache) = sequence.into_cache();
                prompt_cache.store(tokens, cache);
            }
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
                let prompt_cache = PromptCache::new(self.admission.clone(), f.kv_bytes_per_token);
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
                self.loaded = Some((model, prompt_cache));
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
        // Buffers sized by the model (a vocabulary of logits per sequence, a prompt chunk's
        // quantized activations) go with it.
        self.logits = Vec::new();
        super::kernels::release_scratch();
        crate::memory::release_free_memory();
        crate::memory::release_code_pages();
        tracing::info!(rss = %crate::memory::human(crate::memory::rss_bytes()), "student unloaded after keep_alive");
        self.status.lock().expect("status lock").state = LoadState::Unloaded;
    }
}

/// Adds a sequence's end to the counters in `/health`.
fn count(status: &Mutex<StudentStatus>, outcome: Outcome) {
    let mut status = status.lock().expect("status lock");
    match outcome {
        Outcome::Completed => status.completed += 1,
        Outcome::Cancelled => status.cancelled += 1,
        Outcome::Failed => {}
    }
}
