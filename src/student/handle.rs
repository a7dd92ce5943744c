//! [`Student`]: the handle the HTTP edge holds. It admits a request against the memory
//! budget, queues it for the engine thread, and hands back its event stream once the prompt
//! has been read.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::engine::{self, EngineSettings, Job, Shared};
use crate::admission::{Admission, QueuedReservation};
use crate::backend::{ChatBackend, Generation, GenerationRequest, StudentStatus};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

/// Handle to the engine thread; cheap to share between HTTP workers.
pub struct Student {
    jobs: SyncSender<Job>,
    shared: Shared,
    admission: Arc<Admission>,
    max_new_tokens: u64,
    /// No request generates more tokens than this (`student.context_length`).
    context_length: u64,
}

/// Gives a queued request's memory back if the client leaves before the engine starts it.
struct AbandonOnDrop(QueuedReservation);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Events a generation may send beyond one per token: held-back stop-sequence text, the end.
const EXTRA_EVENTS: usize = 4;

/// Tokens a chat template may add around the messages (default system prompt, generation
/// prompt), and around each message (role, start and end markers).
const TEMPLATE_TOKENS: u64 = 64;
const TOKENS_PER_MESSAGE: u64 = 8;

impl Student {
    /// Starts the engine thread; no weights are read until the first request.
    pub fn start(
        config: &StudentConfig,
        name: String,
        admission: Arc<Admission>,
        keep_alive: KeepAlive,
    ) -> Self {
        let shared = Shared::new(StudentStatus::unloaded(
            name,
            crate::student::kernels::tier().name(),
        ));
        let settings = EngineSettings {
            student: config.clone(),
            budget: admission.budget(),
            keep_alive,
        };
        let jobs = engine::spawn(settings, shared.clone(), admission.clone());
        Self {
            jobs,
            shared,
            admission,
            max_new_tokens: config.max_new_tokens as u64,
            context_length: config.context_length as u64,
        }
    }

    /// Test hook: the engine's next forward pass panics, as a bug in a kernel would, so
    /// tests can check what clients and `/health` see then. Not reachable over HTTP.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        self.shared.panic_next_pass.store(true, Ordering::Relaxed);
    }
}

impl ChatBackend for Student {
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'static, Result<Generation, DuetError>> {
        // Memory first: the body, and a key/value cache for at most one token per prompt
        // byte (plus the template's) and max_tokens; the engine trims it once tokenized.
        let text_bytes = request.prompt.text_bytes();
        let max_tokens = request.max_tokens.map_or(self.max_new_tokens, |n| n as u64);
        let template_tokens = TEMPLATE_TOKENS + TOKENS_PER_MESSAGE * request.prompt.pieces();
        let reservation =
            match self
                .admission
                .admit(text_bytes, text_bytes + template_tokens, max_tokens)
            {
                Ok(r) => r,
                Err(e) => return Box::pin(async move { Err(e) }),
            };
        let (started_tx, started_rx) = oneshot::channel();
        // Room for every event the request can produce: a client that reads slowly must never
        // make the engine wait, since every stream of the batch would wait with it. The
        // buffer grows only as events queue up, a few bytes each, at most max_tokens of them.
        let most_tokens = max_tokens.min(self.context_length) as usize;
        let (events_tx, events_rx) = mpsc::channel(most_tokens + EXTRA_EVENTS);
        let reservation = QueuedReservation::new(reservation);
        let job = Job {
            request,
            reservation: reservation.clone(),
            started: started_tx,
            events: events_tx,
        };
        let queued = self.jobs.try_send(job);
        Box::pin(async move {
            // Dropped with this future: if the client leaves while the request waits in the
            // queue, its memory is back at once. Once the engine has started the request the
            // reservation is the engine's and this does nothing.
            let _leave = AbandonOnDrop(reservation);
            match queued {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    return Err(DuetError::Overloaded(
                        "the student's queue is full (student.queue_size); retry shortly".into(),
                    ));
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(DuetError::Internal("the engine thread has stopped".into()));
                }
            }
            let prompt = started_rx
                .await
                .map_err(|_| DuetError::ModelLoad("the engine dropped the request".into()))??;
            Ok(Generation {
                prompt,
                events: events_rx,
            })
        })
    }

    fn status(&self) -> StudentStatus {
        self.shared.status().clone()
    }
}
