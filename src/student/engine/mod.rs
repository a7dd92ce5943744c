//! The engine thread: loads the student when the first job arrives, takes jobs from a
//! bounded queue, and runs every active sequence together (continuous batching): each
//! forward pass carries one new token of every decoding sequence plus a slice of the prompts
//! being read ([`scheduler`]), so a long prompt never stalls the streams already running.
//! Model work never runs on an HTTP worker; a sequence whose client is gone stops at the next
//! pass. A panic in model code (a kernel's assertion, a bug) is caught here: in a forward
//! pass, the requests in flight end with an error, the model is dropped and `/health` says
//! `failed` until the next request loads it again; while a request starts, only that request
//! fails. The panic's message goes to the log only (it may quote a request's text).
//!
//! - [`job`]: a request on its way to the engine;
//! - [`scheduler`]: how many tokens each sequence runs in the next pass;
//! - [`sequence`]: one request's generation;
//! - [`sampler`]: picking the next token;
//! - [`residency`]: loading on demand and unloading after `keep_alive`.

pub mod job;
mod logprobs;
mod residency;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

pub use job::Job;
use sequence::Sequence;

use super::cache::prefix::PromptCache;
use super::load::LoadedModel;
use super::model::MAX_PREFILL_ROWS;
use crate::admission::Admission;
use crate::backend::{LoadState, Outcome, StudentStatus};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

/// What clients and `/health` are told when model code panics: the panic's own message may
/// quote a request's text, so it goes to the server's log only.
const FAILURE: &str = "the student failed with an internal error (see the server's log)";

/// Logs a panic caught on the engine thread with its message.
fn log_panic(panic: &(dyn std::any::Any + Send), during: &str) {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    tracing::error!(%message, "the engine panicked during {during}");
}

/// What the engine needs besides its jobs.
pub struct EngineSettings {
    pub student: StudentConfig,
    pub budget: u64,
    pub keep_alive: KeepAlive,
}

/// What the engine shares with the [`Student`](crate::student::Student) handle.
#[derive(Clone)]
pub struct Shared {
    pub status: Arc<Mutex<StudentStatus>>,
    /// Test hook: when set, the next forward pass panics, as a bug in a kernel would.
    pub panic_next_pass: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(status: StudentStatus) -> Self {
        Self {
            status: Arc::new(Mutex::new(status)),
            panic_next_pass: Arc::default(),
        }
    }

    /// The status, also after a panic elsewhere poisoned its lock (it holds plain data).
    pub fn status(&self) -> MutexGuard<'_, StudentStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the engine thread and returns the sending half of its bounded job queue.
pub fn spawn(
    settings: EngineSettings,
    shared: Shared,
    admission: Arc<Admission>,
) -> SyncSender<Job> {
    let (tx, rx) = sync_channel(settings.student.queue_size);
    let keep_alive = settings.keep_alive;
    let engine = Engine {
        settings,
        shared,
        admission,
        loaded: None,
        load_error: None,
        keep_alive,
        active: Vec::new(),
        logits: Vec::new(),
        plan: Vec::new(),
    };
    std::thread::Builder::new()
        .name("duet-engine".into())
        .spawn(move || engine.run(rx))
        .expect("spawn the engine thread");
    tx
}

struct Engine {
    settings: EngineSettings,
    shared: Shared,
    admission: Arc<Admission>,
    /// The model and the prompt cache that belongs to it.
    loaded: Option<(LoadedModel, PromptCache)>,
    /// Why the model could not be read: it is not read again for every request.
    load_error: Option<String>,
    /// How long to stay loaded without work (the last request's `keep_alive` or the default).
    keep_alive: KeepAlive,
    /// Sequences being generated, in arrival order.
    active: Vec<Sequence>,
    /// The last pass's logits, one row per sequence that ran, and how many tokens each
    /// active sequence ran (both reused from pass to pass).
    logits: Vec<f32>,
    plan: Vec<usize>,
}

impl Engine {
    /// Serves jobs until every `Student` handle is dropped and the last sequence ends.
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.active.is_empty() {
                match self.next_job(&jobs) {
                    Some(job) => self.begin_guarded(job),
                    None => return,
                }
            }
            // Whatever else is waiting joins the batch at once.
            while self.active.len() < self.settings.student.parallel {
                match jobs.try_recv() {
                    Ok(job) => self.begin_guarded(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.active.is_empty()
                && let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.pass()))
            {
                log_panic(&*panic, "a forward pass");
                self.recover();
            }
        }
    }

    /// [`begin`](Self::begin), recovering from a panic inside it. Starting a request does
    /// not touch the forward pass's state, so only that request fails (its client is told
    /// when its answer channel drops) and the others go on; a panic while loading marks the
    /// model failed like any load error.
    fn begin_guarded(&mut self, job: Job) {
        let was_loaded = self.loaded.is_some();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.begin(job))) {
            log_panic(&*panic, "starting a request");
            if !was_loaded {
                self.release_model();
                self.load_error = Some(FAILURE.into());
                self.shared.status().state = LoadState::Failed {
                    reason: FAILURE.into(),
                };
            }
        }
    }

    /// After a panic in a forward pass nothing the model holds can be trusted: every request
    /// in flight ends with an error (an SSE error event for a stream that started; a 503,
    /// which hybrid mode hands to the teacher, for one that had not), the model and its
    /// caches are dropped, and `/health` says `failed` until the next request loads it again.
    fn recover(&mut self) {
        // Said first: a client told of the failure may read /health right away.
        self.shared.status().state = LoadState::Failed {
            reason: FAILURE.into(),
        };
        for mut sequence in self.active.drain(..) {
            sequence.fail(DuetError::ModelLoad(FAILURE.into()));
        }
        self.release_model();
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
            let reason = self.load_error.clone().unwrap_or_default();
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
            Err(outcome) => self.count(outcome),
        }
    }

    /// One forward pass over the active sequences: a token for each decoding one and up to
    /// `MAX_PREFILL_ROWS` prompt tokens, given to the earliest sequences still reading theirs.
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
        let plan = &mut self.plan;
        scheduler::plan_pass(
            self.active.iter().map(Sequence::prefill_left),
            MAX_PREFILL_ROWS,
            plan,
        );
        let mut steps: Vec<_> = self
            .active
            .iter_mut()
            .zip(plan.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(sequence, &n)| sequence.step(n))
            .collect();
        if self.shared.panic_next_pass.swap(false, Ordering::Relaxed) {
            panic!("injected by a test through Student::inject_panic");
        }
        let logits = &mut self.logits;
        let result = if steps.is_empty() {
            Ok(())
        } else {
            model.model.forward_batch(&mut steps, logits)
        };
        let batch = steps.len() as u64;
        drop(steps);
        match result {
            Ok(()) => {
                let mut rows = logits.chunks_exact_mut(model.model.shape.vocab);
                let mut index = 0;
                for &n in plan.iter() {
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
        {
            let mut status = self.shared.status();
            if batch > 0 {
                status.forward_passes += 1;
                status.batched_sequences += batch;
            }
            for (_, outcome) in &ended {
                status.count(*outcome);
            }
        }
        for (sequence, outcome) in ended {
            if outcome != Outcome::Failed {
                let (tokens, cache) = sequence.into_cache();
                prompt_cache.store(tokens, cache);
            }
        }
    }

    /// Adds a sequence's end to the counters in `/health`.
    fn count(&self, outcome: Outcome) {
        self.shared.status().count(outcome);
    }
}
