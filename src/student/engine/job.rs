//! [`Job`]: a request on its way from the [`Student`](crate::student::Student) handle to the
//! engine thread, carrying where its answer goes.

use tokio::sync::{mpsc, oneshot};

use crate::admission::QueuedReservation;
use crate::backend::{GenEvent, GenerationRequest, PromptRead};
use crate::error::DuetError;

/// A request waiting for the engine, with where its answer goes.
pub struct Job {
    pub request: GenerationRequest,
    /// The memory admission granted: the engine claims it when the job starts; a client that
    /// leaves before that gives it back at once.
    pub reservation: QueuedReservation,
    /// Resolved with what was read of the prompt once prefill is done (or with the error).
    pub started: oneshot::Sender<Result<PromptRead, DuetError>>,
    pub events: mpsc::Sender<GenEvent>,
}
