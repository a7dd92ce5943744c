//! Admission control with memory as the currency. The budget (`memory.max_bytes`) must
//! hold the student's fixed footprint (weights, tokenizer, runtime) plus every admitted
//! request's reservation: its body and the key/value cache its prompt and `max_tokens`
//! may fill. A request that does not fit now is refused (429 with Retry-After, or handed
//! to the teacher in hybrid mode); the queue is also bounded by count.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::DuetError;

/// Fixed per-request overhead beyond the body (parsed copies, token ids, events).
const REQUEST_OVERHEAD: u64 = 64 * 1024;

/// The shared ledger.
pub struct Admission {
    budget: u64,
    state: Mutex<Ledger>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ledger {
    /// The student's footprint without any request, as estimated from its GGUF header
    /// and known after its first load; kept through unloads (the next request loads it
    /// again); 0 while nothing is known, when the first burst is bounded by the queue.
    pub fixed_bytes: u64,
    /// Key/value cache bytes one token occupies (0 until the model was read once).
    pub kv_bytes_per_token: u64,
    /// Longest sequence a request may use.
    pub context_length: u64,
    /// Sum of the reservations held by admitted requests.
    pub reserved_bytes: u64,
    pub admitted: u64,
    pub refused: u64,
}

/// What the student knows about a model once it has read it.
#[derive(Debug, Clone, Copy)]
pub struct ModelFacts {
    pub fixed_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub context_length: u64,
}

impl Admission {
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            budget,
            state: Mutex::new(Ledger::default()),
        })
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn ledger(&self) -> Ledger {
        self.state.lock().expect("ledger lock").clone()
    }

    /// Records what a loaded (or measured) model needs; later admissions use it.
    pub fn learn(&self, facts: ModelFacts) {
        let mut s = self.state.lock().expect("ledger lock");
        s.fixed_bytes = facts.fixed_bytes;
        s.kv_bytes_per_token = facts.kv_bytes_per_token;
        s.context_length = facts.context_length;
    }

    /// Reserves what a request may need: `body_bytes` plus the key/value cache of
    /// `prompt_tokens_bound + max_tokens` tokens (capped at the context).
    pub fn admit(
        self: &Arc<Self>,
        body_bytes: u64,
        prompt_tokens_bound: u64,
        max_tokens: u64,
    ) -> Result<Reservation, DuetError> {
        let mut s = self.state.lock().expect("ledger lock");
        let tokens = if s.context_length > 0 {
            (prompt_tokens_bound + max_tokens).min(s.context_length)
        } else {
            prompt_tokens_bound + max_tokens
        };
        let bytes = body_bytes + REQUEST_OVERHEAD + tokens * s.kv_bytes_per_token;
        if s.fixed_bytes + s.reserved_bytes + bytes > self.budget {
            s.refused += 1;
            return Err(DuetError::Overloaded(format!(
                "the memory budget is spent: this request needs {} and {} of the {} budget is in use; retry shortly",
                crate::memory::human(bytes),
                crate::memory::human(s.fixed_bytes + s.reserved_bytes),
                crate::memory::human(self.budget),
            )));
        }
        s.reserved_bytes += bytes;
        s.admitted += 1;
        Ok(Reservation {
            admission: self.clone(),
            body_bytes,
            bytes,
        })
    }
}

/// Memory held for one admitted request, returned when it is dropped (request finished,
/// failed, or its client went away).
pub struct Reservation {
    admission: Arc<Admission>,
    body_bytes: u64,
    bytes: u64,
}

impl Reservation {
    /// Adjusts the reservation to the exact sequence length, once the prompt is tokenized.
    pub fn set_tokens(&mut self, tokens: u64) {
        let mut s = self.admission.state.lock().expect("ledger lock");
        let bytes = self.body_bytes + REQUEST_OVERHEAD + tokens * s.kv_bytes_per_token;
        s.reserved_bytes = s.reserved_bytes - self.bytes + bytes;
        self.bytes = bytes;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = self.admission.state.lock().expect("ledger lock");
        s.reserved_bytes -= self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_by_the_budget_and_returned_on_drop() {
        let a = Admission::new(10_000_000);
        a.learn(ModelFacts {
            fixed_bytes: 6_000_000,
            kv_bytes_per_token: 1_000,
            context_length: 2_000,
        });
        let first = a.admit(1_000, 500, 1_000).unwrap(); // ~1.57 MB
        let second = a.admit(1_000, 500, 1_000).unwrap();
        assert!(
            a.admit(1_000, 500, 1_000).is_err(),
            "a third does not fit in 4 MB"
        );
        assert_eq!(a.ledger().refused, 1);
        drop(first);
        let mut third = a.admit(1_000, 500, 1_000).unwrap();
        third.set_tokens(100);
        assert_eq!(third.bytes(), 1_000 + REQUEST_OVERHEAD + 100 * 1_000);
        assert_eq!(a.ledger().reserved_bytes, second.bytes() + third.bytes());
        drop((second, third));
        assert_eq!(a.ledger().reserved_bytes, 0);
    }

    #[test]
    fn sequences_are_capped_at_the_context() {
        let a = Admission::new(u64::MAX);
        a.learn(ModelFacts {
            fixed_bytes: 0,
            kv_bytes_per_token: 10,
            context_length: 100,
        });
        let r = a.admit(0, 1_000, 1_000).unwrap();
        assert_eq!(r.bytes(), REQUEST_OVERHEAD + 100 * 10);
    }
}
