//! Admission control with memory as the currency. The budget (`memory.max_bytes`) must
//! hold the student's fixed footprint (weights, tokenizer, runtime) plus every admitted
//! request's reservation: its body and the key/value cache its prompt and `max_tokens`
//! may fill. A request that does not fit now is refused (429 with Retry-After, or handed
//! to the teacher in hybrid mode); the queue is also bounded by count.
//!
//! Cached prompt prefixes (the engine's prompt cache) are held in the same ledger, but
//! they give way: a request that fits only without them evicts them instead of being
//! refused.

use std::sync::{Arc, Mutex, PoisonError};

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
    /// Key/value cache kept for prompt prefixes that later requests may share.
    pub prompt_cache_bytes: u64,
    /// Bumped whenever a request evicts the prompt cache; the engine drops entries
    /// recorded under an older generation.
    pub prompt_cache_generation: u64,
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
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records what a loaded (or measured) model needs; later admissions use it.
    pub fn learn(&self, facts: ModelFacts) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let tokens = if s.context_length > 0 {
            (prompt_tokens_bound + max_tokens).min(s.context_length)
        } else {
            prompt_tokens_bound + max_tokens
        };
        let bytes = body_bytes + REQUEST_OVERHEAD + tokens * s.kv_bytes_per_token;
        let in_use = s.fixed_bytes + s.reserved_bytes;
        if in_use + s.prompt_cache_bytes + bytes > self.budget && in_use + bytes <= self.budget {
            // Requests come first: cached prefixes are only an optimisation.
            s.prompt_cache_bytes = 0;
            s.prompt_cache_generation += 1;
        }
        if s.fixed_bytes + s.reserved_bytes + s.prompt_cache_bytes + bytes > self.budget {
            s.refused += 1;
            return Err(DuetError::Overloaded(format!(
                "the memory budget is spent: this request needs {} and {} of the {} budget is in use; retry shortly",
                crate::memory::human(bytes),
                crate::memory::human(s.fixed_bytes + s.reserved_bytes + s.prompt_cache_bytes),
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

    /// Claims `bytes` for the prompt cache if the budget has room beside every request;
    /// returns the generation the claim belongs to.
    pub fn hold_prompt_cache(&self, bytes: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.fixed_bytes + s.reserved_bytes + s.prompt_cache_bytes + bytes > self.budget {
            return None;
        }
        s.prompt_cache_bytes += bytes;
        Some(s.prompt_cache_generation)
    }

    /// Returns a claim made by `hold_prompt_cache`, unless an eviction already did.
    pub fn release_prompt_cache(&self, bytes: u64, generation: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.prompt_cache_generation == generation {
            s.prompt_cache_bytes -= bytes;
        }
    }

    /// The current prompt cache generation (see [`Ledger::prompt_cache_generation`]).
    pub fn prompt_cache_generation(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .prompt_cache_generation
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
        let mut s = self
            .admission
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bytes = self.body_bytes + REQUEST_OVERHEAD + tokens * s.kv_bytes_per_token;
        s.reserved_bytes = s.reserved_bytes - self.bytes + bytes;
        self.bytes = bytes;
        if s.fixed_bytes + s.reserved_bytes + s.prompt_cache_bytes > self.admission.budget {
            // The prompt came out longer than admission's bound: cached prefixes make room.
            s.prompt_cache_bytes = 0;
            s.prompt_cache_generation += 1;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A reservation whose request waits in a queue. Whoever comes first settles it: the engine
/// starting the request takes it over, or the client leaving gives the memory back at once
/// (instead of when the engine reaches the request and finds nobody waiting).
#[derive(Clone)]
pub struct QueuedReservation(Arc<Mutex<Option<Reservation>>>);

impl QueuedReservation {
    pub fn new(reservation: Reservation) -> Self {
        Self(Arc::new(Mutex::new(Some(reservation))))
    }

    /// The engine starts the request: the reservation is its own, unless the client left.
    pub fn claim(&self) -> Option<Reservation> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// The client left: returns the memory if the request has not started.
    pub fn abandon(&self) {
        drop(self.claim());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = self
            .admission
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
    fn the_prompt_cache_gives_way_to_requests() {
        let a = Admission::new(10_000_000);
        a.learn(ModelFacts {
            fixed_bytes: 6_000_000,
            kv_bytes_per_token: 1_000,
            context_length: 2_000,
        });
        let generation = a
            .hold_prompt_cache(3_000_000)
            .expect("room for a cached prefix");
        assert!(
            a.hold_prompt_cache(2_000_000).is_none(),
            "beyond the budget"
        );
        // 1.57 MB fits only without the cached prefix: admitted, and the cache evicted.
        let r = a.admit(1_000, 500, 1_000).unwrap();
        let l = a.ledger();
        assert_eq!(
            (l.prompt_cache_bytes, l.prompt_cache_generation),
            (0, generation + 1)
        );
        a.release_prompt_cache(3_000_000, generation); // the engine's late release: ignored
        assert_eq!(a.ledger().prompt_cache_bytes, 0);
        // A request that does not fit even without the cache is refused and evicts nothing.
        let r2 = a.admit(1_000, 500, 1_000).unwrap(); // 9.14 MB in use
        let g = a.hold_prompt_cache(500_000).unwrap();
        assert!(a.admit(1_000, 500, 1_000).is_err());
        assert_eq!(a.ledger().prompt_cache_bytes, 500_000);
        a.release_prompt_cache(500_000, g);
        assert_eq!(a.ledger().prompt_cache_bytes, 0);
        drop((r, r2));
    }

    #[test]
    fn a_prompt_longer_than_admitted_evicts_the_prompt_cache() {
        let a = Admission::new(10_000_000);
        a.learn(ModelFacts {
            fixed_bytes: 6_000_000,
            kv_bytes_per_token: 1_000,
            context_length: 4_000,
        });
        let mut r = a.admit(0, 100, 100).unwrap();
        let generation = a.hold_prompt_cache(3_000_000).unwrap();
        r.set_tokens(1_500); // tokenized longer than bounded: 10.57 MB with the cache
        let l = a.ledger();
        assert_eq!(
            (l.prompt_cache_bytes, l.prompt_cache_generation),
            (0, generation + 1)
        );
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
