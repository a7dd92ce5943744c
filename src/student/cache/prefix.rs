//! The prompt cache: key/value caches of finished sequences, kept so that a request whose
//! prompt starts with the same tokens (a conversation's next turn, a shared system prompt)
//! skips prefill for that prefix. Every kept byte is claimed from the memory budget, and a
//! request that needs the memory evicts the cache (see `admission.rs`).

use std::sync::Arc;

use super::kv::KvCache;
use crate::admission::Admission;

/// Caches kept at most; the oldest goes first.
const ENTRIES: usize = 4;

/// A finished sequence's cache and the tokens it holds.
struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
    /// Bytes claimed from the budget, and under which eviction generation.
    bytes: u64,
    generation: u64,
}

/// A cache taken for reuse: the first `reused` tokens of the prompt are already in it.
pub struct Hit {
    pub cache: KvCache,
    pub reused: usize,
}

pub struct PromptCache {
    admission: Arc<Admission>,
    kv_bytes_per_token: u64,
    /// Oldest first.
    entries: Vec<Entry>,
}

impl PromptCache {
    pub fn new(admission: Arc<Admission>, kv_bytes_per_token: u64) -> Self {
        Self {
            admission,
            kv_bytes_per_token,
            entries: Vec::new(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Takes the entry sharing the longest prefix with `prompt`, if any shares a token. At
    /// least the prompt's last token is left to run, since its logits are needed.
    pub fn take(&mut self, prompt: &[u32]) -> Option<Hit> {
        self.drop_evicted();
        let (index, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(_, shared)| shared)?;
        let reused = shared.min(prompt.len().saturating_sub(1));
        if reused == 0 {
            return None;
        }
        let entry = self.entries.remove(index);
        self.admission
            .release_prompt_cache(entry.bytes, entry.generation);
        let mut cache = entry.cache;
        cache.truncate(reused);
        Some(Hit { cache, reused })
    }

    /// Keeps `cache` (holding `tokens`) if the budget has room, trimmed to what it holds.
    pub fn store(&mut self, tokens: Vec<u32>, mut cache: KvCache) {
        self.drop_evicted();
        if tokens.is_empty() || tokens.len() != cache.len() {
            return;
        }
        // A newer cache holding the same start makes the older one redundant.
        self.entries
            .retain(|e| common_prefix(&e.tokens, &tokens) < e.tokens.len().min(tokens.len()));
        while self.entries.len() >= ENTRIES {
            self.evict_oldest();
        }
        cache.resize(tokens.len(), true);
        let bytes = tokens.len() as u64 * self.kv_bytes_per_token;
        loop {
            if let Some(generation) = self.admission.hold_prompt_cache(bytes) {
                self.entries.push(Entry {
                    tokens,
                    cache,
                    bytes,
                    generation,
                });
                return;
            }
            if self.entries.is_empty() {
                return; // no room even alone: not kept
            }
            self.evict_oldest();
        }
    }

    /// Forgets everything (the model is being unloaded).
    pub fn clear(&mut self) {
        while !self.entries.is_empty() {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let e = self.entries.remove(0);
        self.admission.release_prompt_cache(e.bytes, e.generation);
    }

    /// Drops entries a request evicted (their bytes are already back in the budget).
    pub fn drop_evicted(&mut self) {
        let current = self.admission.prompt_cache_generation();
        self.entries.retain(|e| e.generation == current);
    }
}

impl Drop for PromptCache {
    fn drop(&mut self) {
        self.clear();
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::ModelFacts;
    use crate::student::model::Architecture;
    use crate::student::model::ModelShape;

    fn shape() -> ModelShape {
        ModelShape {
            architecture: Architecture::Llama,
            layers: 2,
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            ffn: 16,
            vocab: 16,
            trained_context: 64,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
        }
    }

    /// A cache that claims to hold `n` tokens (contents do not matter here).
    fn filled(n: usize) -> KvCache {
        let mut c = shape().empty_cache();
        c.resize(n + 10, false);
        c.set_len_for_tests(n);
        c
    }

    #[test]
    fn reuses_the_longest_shared_prefix_and_accounts_for_it() {
        let per_token = shape().kv_bytes_per_token() as u64;
        let admission = Admission::new(1 << 30);
        admission.learn(ModelFacts {
            fixed_bytes: 0,
            kv_bytes_per_token: per_token,
            context_length: 64,
        });
        let mut pc = PromptCache::new(admission.clone(), per_token);
        pc.store(vec![1, 2, 3, 4], filled(4));
        pc.store(vec![1, 2, 9], filled(3));
        assert_eq!(pc.bytes(), 7 * per_token);
        assert_eq!(admission.ledger().prompt_cache_bytes, 7 * per_token);

        let hit = pc.take(&[1, 2, 3, 4, 5, 6]).expect("shares four tokens");
        assert_eq!((hit.reused, hit.cache.len()), (4, 4));
        assert_eq!(admission.ledger().prompt_cache_bytes, 3 * per_token);
        // The whole prompt cached: its last token still runs.
        assert_eq!(pc.take(&[1, 2, 9]).unwrap().reused, 2);
        assert!(pc.take(&[7, 8]).is_none());
        assert_eq!(admission.ledger().prompt_cache_bytes, 0);
    }

    #[test]
    fn keeps_nothing_beyond_the_budget_and_yields_to_requests() {
        // What the ledger charges per token (the test caches' real size does not matter).
        let per_token = 100_000;
        let admission = Admission::new(1_100_000);
        admission.learn(ModelFacts {
            fixed_bytes: 0,
            kv_bytes_per_token: per_token,
            context_length: 64,
        });
        let mut pc = PromptCache::new(admission.clone(), per_token);
        pc.store((0..20).collect(), filled(20));
        assert_eq!(pc.bytes(), 0, "20 tokens do not fit an 11-token budget");
        pc.store((0..8).collect(), filled(8));
        assert_eq!(pc.bytes(), 8 * per_token);
        // A request needing 9 tokens' worth fits only without the cache: it evicts it.
        let r = admission.admit(0, 4, 5).unwrap();
        assert!(pc.take(&(0..8).collect::<Vec<_>>()).is_none());
        assert_eq!(admission.ledger().prompt_cache_bytes, 0);
        drop(r);
    }
}
