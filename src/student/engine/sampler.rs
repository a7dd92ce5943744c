//! Choosing the next token from logits: OpenAI's logit bias, presence and frequency
//! penalties, temperature, top-k, top-p and min-p, with a seedable generator so a seed
//! reproduces a text. What a request leaves out comes from the model's defaults.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::{SamplingDefaults, SamplingParams};

/// Per-sequence sampler state: the generator and how often each token was generated.
pub struct Sampler {
    params: SamplingParams,
    temperature: f32,
    top_p: f32,
    /// 0: all tokens.
    top_k: usize,
    min_p: f32,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    /// Reused between steps so sampling allocates nothing per token.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`, with `defaults` for what they leave out.
    pub fn new(params: SamplingParams, defaults: &SamplingDefaults) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            temperature: params.temperature.unwrap_or(defaults.temperature),
            top_p: params.top_p.unwrap_or(defaults.top_p),
            top_k: params.top_k.unwrap_or(defaults.top_k),
            min_p: params.min_p.unwrap_or(defaults.min_p),
            params,
            rng,
            counts: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// Adds the request's `logit_bias` (before log probabilities are read, so a banned
    /// token reads as impossible there too).
    pub fn apply_bias(&self, logits: &mut [f32]) {
        for &(token, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
    }

    /// Picks the next token from biased logits and records it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = self.choose(logits);
        self.record(token);
        token
    }

    /// Draws a token from logits the penalties were applied to (again after a grammar
    /// masked the ones it refused), recording nothing.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_stochastic(logits)
        }
    }

    /// Counts `token` as generated, for the penalties.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// OpenAI's definition: logit -= presence * [count > 0] + frequency * count, over
    /// the tokens generated so far.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let (p, f) = (self.params.presence_penalty, self.params.frequency_penalty);
        if p == 0.0 && f == 0.0 {
            return;
        }
        for (&token, &count) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= p + f * count as f32;
            }
        }
    }

    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.temperature;
        let vocab = logits.len();
        let top_k = match self.top_k {
            0 => vocab,
            k => k.min(vocab),
        };
        // Only the head of the distribution is ever sorted: start with at most 64
        // candidates and widen only while top-p needs more mass than they hold.
        let mut width = top_k.min(64);
        // The softmax denominator over the whole vocabulary, once per token.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits
            .iter()
            .map(|&l| ((l - max) / temperature).exp())
            .sum();
        loop {
            self.select_top(logits, width);
            let probs_mass = self.normalize(temperature, max, z);
            if width == top_k || probs_mass >= self.top_p {
                break;
            }
            width = (width * 4).min(top_k);
        }
        // Truncate to the nucleus and to min-p, then draw.
        let mut cumulative = 0.0;
        let mut keep = self.candidates.len();
        for (i, &(_, p)) in self.candidates.iter().enumerate() {
            cumulative += p;
            if cumulative >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        let floor = self.min_p * self.candidates[0].1;
        keep = keep.min(
            self.candidates
                .iter()
                .take_while(|c| c.1 >= floor)
                .count()
                .max(1),
        );
        let total: f32 = self.candidates[..keep].iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(token, p) in &self.candidates[..keep] {
            r -= p;
            if r <= 0.0 {
                return token;
            }
        }
        self.candidates[keep - 1].0
    }

    /// Fills `candidates` with the `width` largest logits, sorted, largest first.
    fn select_top(&mut self, logits: &[f32], width: usize) {
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if width < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(width - 1, by_logit_desc);
            self.candidates.truncate(width);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
    }

    /// Turns the candidates' logits into probabilities over the whole vocabulary (at this
    /// temperature) and returns the mass the candidates hold.
    fn normalize(&mut self, temperature: f32, max: f32, z: f32) -> f32 {
        let mut mass = 0.0;
        for c in &mut self.candidates {
            c.1 = ((c.1 - max) / temperature).exp() / z;
            mass += c.1;
        }
        mass
    }
}

/// Index of the largest logit (greedy decoding); also what tests compare with.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.5, -1.0, 2.4, 0.0, 1.0, -3.0, 0.5]
    }

    /// Defaults that change nothing, so each test sees only what it sets.
    const OPEN: SamplingDefaults = SamplingDefaults {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature: Some(temperature),
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(params(0.0), &OPEN);
        for _ in 0..5 {
            assert_eq!(s.sample(&mut logits()), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let draw = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: Some(1.5),
                    seed: Some(seed),
                    ..Default::default()
                },
                &OPEN,
            );
            (0..64).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_keeps_only_the_likeliest() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: Some(5.0),
                top_k: Some(2),
                ..params(5.0)
            },
            &OPEN,
        );
        for _ in 0..200 {
            let t = s.sample(&mut logits());
            assert!(t == 1 || t == 3, "token {t} is outside the top 2");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities at temperature 1: token 1 and 3 hold about 0.37 + 0.34 of the mass.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: Some(0.6),
                ..params(1.0)
            },
            &OPEN,
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&mut logits()));
        }
        assert_eq!(seen, [1, 3].into_iter().collect());
    }

    #[test]
    fn top_p_widens_past_the_first_candidates() {
        // 1,000 equal logits: top-p 0.5 needs 500 of them, more than the first 64.
        let flat = vec![0.0f32; 1000];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: Some(0.5),
                ..params(1.0)
            },
            &OPEN,
        );
        let distinct: std::collections::HashSet<_> =
            (0..2000).map(|_| s.sample(&mut flat.clone())).collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct tokens",
            distinct.len()
        );
    }

    #[test]
    fn penalties_push_away_repeats() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 2.0,
                ..params(0.0)
            },
            &OPEN,
        );
        assert_eq!(s.sample(&mut logits()), 1);
        // Token 1 now pays 2.0, so 3 (2.4) beats 1 (0.5).
        assert_eq!(s.sample(&mut logits()), 3);
    }

    #[test]
    fn min_p_drops_the_unlikely_and_defaults_fill_what_is_left_out() {
        // min_p 0.5: only tokens at least half as likely as the best (1 and 3) remain.
        let mut s = Sampler::new(
            SamplingParams {
                min_p: Some(0.5),
                ..params(1.0)
            },
            &OPEN,
        );
        for _ in 0..300 {
            let t = s.sample(&mut logits());
            assert!(t == 1 || t == 3, "token {t} is under min_p");
        }
        let defaults = SamplingDefaults::default();
        let s = Sampler::new(SamplingParams::default(), &defaults);
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p),
            (0.8, 40, 0.95, 0.05)
        );
    }
}
