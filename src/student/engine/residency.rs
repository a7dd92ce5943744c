//! The model's residency on the engine thread: loaded when a job needs it (after checking
//! that it fits the memory budget), unloaded after `keep_alive` without work, and its memory
//! really handed back to the operating system each time it goes.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use super::{Engine, Job};
use crate::admission::ModelFacts;
use crate::backend::LoadState;
use crate::error::DuetError;
use crate::memory::{self, KeepAlive};
use crate::student::cache::prefix::PromptCache;
use crate::student::kernels;
use crate::student::load::LoadedModel;

impl Engine {
    /// The next job; while loaded and idle past `keep_alive`, unloads first.
    pub(super) fn next_job(&mut self, jobs: &Receiver<Job>) -> Option<Job> {
        loop {
            let idle_limit = match (&self.loaded, self.keep_alive) {
                (Some(_), KeepAlive::For(limit)) => limit,
                _ => return jobs.recv().ok(),
            };
            match jobs.recv_timeout(idle_limit) {
                Ok(job) => return Some(job),
                Err(RecvTimeoutError::Timeout) => {
                    self.release_model();
                    tracing::info!(rss = %memory::human(memory::rss_bytes()), "student unloaded after keep_alive");
                    self.shared.status().state = LoadState::Unloaded;
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Reads the model, unless reading it failed before (a model that cannot be read is not
    /// re-read for every request; one that panicked while generating is).
    pub(super) fn load(&mut self) {
        if self.load_error.is_some() {
            return;
        }
        self.shared.status().state = LoadState::Loading;
        let started = Instant::now();
        let result = LoadedModel::load(&self.settings.student, self.settings.budget);
        memory::release_free_memory();
        let mut status = self.shared.status();
        match result {
            Ok(model) => {
                let load_seconds = started.elapsed().as_secs_f64();
                let measured = memory::rss_bytes();
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
                    estimated = %memory::human(f.fixed_bytes()),
                    measured_rss = %memory::human(measured),
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
                status.state = LoadState::Failed {
                    reason: reason.clone(),
                };
                self.load_error = Some(reason);
            }
        }
    }

    /// Drops the model and hands its memory back to the operating system.
    pub(super) fn release_model(&mut self) {
        self.loaded = None;
        // Buffers sized by the model (a vocabulary of logits per sequence, a prompt chunk's
        // quantized activations) go with it.
        self.logits = Vec::new();
        kernels::release_scratch();
        memory::release_free_memory();
        memory::release_code_pages();
    }
}
