//! One sequence's grammar: which sampled tokens it accepts, the mask when it refuses one,
//! and whether the output is complete.

use llguidance::{Matcher, TokenParser};

/// Follows a sequence's output through its grammar.
pub struct Guide {
    matcher: Matcher,
    end_tokens: Vec<u32>,
}

impl Guide {
    pub(super) fn new(parser: TokenParser, end_tokens: &[u32]) -> Self {
        Self {
            matcher: Matcher::new(Ok(parser)),
            end_tokens: end_tokens.to_vec(),
        }
    }

    /// Whether `token` may come next: an end token only where the grammar may end, and
    /// nothing but an end token once the grammar is complete.
    pub fn allows(&mut self, token: u32) -> Result<bool, String> {
        if let Some(error) = self.matcher.get_error() {
            return Err(error);
        }
        if self.matcher.is_stopped() {
            return Ok(self.end_tokens.contains(&token));
        }
        self.matcher
            .validate_tokens(&[token])
            .map(|accepted| accepted == 1)
            .map_err(|e| format!("{e:#}"))
    }

    /// Sets every logit the grammar forbids next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| format!("{e:#}"))?;
        for (i, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves past `token`, which [`allows`](Self::allows) accepted (not an end token).
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("{e:#}"))
    }

    /// Whether the grammar is complete: only the end of the turn may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
