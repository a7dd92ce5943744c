//! Log probabilities of generated tokens, as OpenAI reports them: the chosen token's
//! `log softmax` under the model's (biased) distribution, and the likeliest alternatives at
//! the same position.

use crate::backend::{TokenLogprob, TokenText};
use crate::student::text::tokenizer::StudentTokenizer;

/// Alternatives a request may ask for per token (OpenAI allows 20 in chat, 5 in completions).
pub const MOST_ALTERNATIVES: usize = 20;

/// The logits of one position, kept before sampling changes them.
#[derive(Default)]
pub struct LogprobScratch {
    logits: Vec<f32>,
    top: Vec<(u32, f32)>,
}

impl LogprobScratch {
    /// Keeps the logits of the position about to be sampled (sampling changes them).
    pub fn keep(&mut self, logits: &[f32]) {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
    }

    /// The kept position's entry for the sampled `token`.
    pub fn entry(
        &mut self,
        token: u32,
        alternatives: usize,
        tokenizer: &StudentTokenizer,
    ) -> TokenLogprob {
        let logits = &self.logits;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let top = &mut self.top;
        top.clear();
        let wanted = alternatives.min(MOST_ALTERNATIVES);
        if wanted > 0 {
            for (id, &l) in logits.iter().enumerate() {
                if top.len() < wanted || l > top[top.len() - 1].1 {
                    let at = top.partition_point(|&(_, t)| t >= l);
                    top.insert(at, (id as u32, l));
                    top.truncate(wanted);
                }
            }
        }
        let logprob = |l: f32| (l - log_sum).max(-9999.0);
        TokenLogprob {
            token: token_text(tokenizer, token),
            logprob: logprob(logits[token as usize]),
            top: top
                .iter()
                .map(|&(id, l)| (token_text(tokenizer, id), logprob(l)))
                .collect(),
        }
    }
}

fn token_text(tokenizer: &StudentTokenizer, id: u32) -> TokenText {
    let bytes = tokenizer.bytes(id).to_vec();
    TokenText {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}
