//! The vocabulary as llguidance reads it: each token's raw bytes, special tokens as the
//! byte 0xFF and their name (so neither free text nor JSON can ever spell `<|im_end|>` or
//! `<tool_call>`; a grammar names them), ids past the tokenizer's vocabulary empty (never
//! allowed).

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::student::text::tokenizer::StudentTokenizer;

/// The token trie. duet samples every token itself and only asks the grammar whether it
/// may come next, so llguidance never needs the model's own tokenization of forced text:
/// saying it has none (not canonical) turns its token forcing off and spares a second copy
/// of the tokenizer.
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(bytes)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// llguidance's view of a model with `vocab` logits, ending with any of `end_tokens`.
pub fn token_env(tokenizer: &StudentTokenizer, vocab: usize, end_tokens: &[u32]) -> TokEnv {
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            if tokenizer.is_special(id) {
                let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                word.extend_from_slice(tokenizer.bytes(id));
                word
            } else {
                tokenizer.bytes(id).to_vec()
            }
        })
        .collect();
    let first_end = end_tokens.first().copied().unwrap_or(0);
    let mut trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first_end), &words);
    if !end_tokens.is_empty() {
        trie = trie.with_eos_tokens(end_tokens);
    }
    Arc::new(Env { trie })
}
