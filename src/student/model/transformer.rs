//! The decoder-only transformer behind `llama` and `qwen2` GGUF files.
//!
//! Every weight matrix, the token-embedding table included, stays in the GGUF's quantized
//! format in memory: embedding rows are dequantized only for the tokens being looked up.
//! That is what keeps duet's resident memory close to the file size (candle's reference
//! loaders expand the embedding table to f32, which more than doubles it for small models).
//! The forward pass works on plain `f32` rows in buffers reused from pass to pass (the one
//! allocation per pass is the embedding rows of its tokens): matrix products go to `student/kernels/` or candle's quantized
//! kernels, the rest to [`ops`](super::ops) and [`attention`](super::attention). The
//! key/value caches live outside the model ([`KvCache`]), so one loaded model serves any
//! number of sequences, several per pass.

use std::sync::{Arc, Mutex};

use super::attention::{Heads, attend};
use super::ops::{self, Rope};
use super::shape::ModelShape;
use super::weights::QuantMatrix;
use crate::student::cache::kv::KvCache;

/// A linear layer with quantized weights and, for qwen2's q/k/v, an f32 bias.
pub(crate) struct Linear {
    pub(crate) weight: QuantMatrix,
    pub(crate) bias: Option<Vec<f32>>,
}

impl Linear {
    /// `out = x @ weight^T (+ bias)` for `rows` rows.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        out.resize(rows * self.weight.out_features(), 0.0);
        self.weight.matmul(x, rows, out)?;
        if let Some(bias) = &self.bias {
            ops::add_bias(out, bias);
        }
        Ok(())
    }
}

/// One transformer block's weights.
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// One sequence's part of a forward pass: its next tokens and its cache.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Activation buffers, kept between passes so that decoding allocates nothing per token.
#[derive(Default)]
struct Buffers {
    ids: Vec<u32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    last: Vec<f32>,
}

/// A loaded model: quantized weights and rotary tables, shareable across sequences.
pub struct Transformer {
    pub shape: ModelShape,
    embed: Arc<QuantMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Arc<QuantMatrix>,
    rope: Rope,
    buffers: Mutex<Buffers>,
}

impl Transformer {
    /// Assembles a model from its weights (see `load::tensors`); `rope` bounds the longest
    /// sequence this instance accepts.
    pub(crate) fn new(
        shape: ModelShape,
        embed: Arc<QuantMatrix>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        output: Arc<QuantMatrix>,
        rope: Rope,
    ) -> Self {
        Self {
            shape,
            embed,
            layers,
            norm,
            output,
            rope,
            buffers: Mutex::new(Buffers::default()),
        }
    }

    /// Runs several sequences' next tokens in one pass: every matrix product sees all their
    /// rows at once, so each weight is read once per pass, not once per sequence; only
    /// attention runs per sequence, against its own cache. Leaves in `logits` each
    /// sequence's `vocab` logits for its last token, one after the other.
    pub fn forward_batch(
        &self,
        steps: &mut [Step<'_>],
        logits: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        let s = &self.shape;
        let mut guard = self.buffers.lock().expect("buffers lock");
        let b = &mut *guard;
        b.ids.clear();
        for step in steps.iter_mut() {
            let (pos, t) = (step.cache.len(), step.tokens.len());
            if t == 0 || pos + t > self.context() {
                candle_core::bail!("{t} tokens after {pos} do not fit the context");
            }
            step.cache.resize(pos + t, false);
            b.ids.extend_from_slice(step.tokens);
        }
        let rows = b.ids.len();
        let eps = s.rms_eps as f32;
        let heads = Heads {
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
        };
        let (q_row, kv_row) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        self.embed.rows(&b.ids, &mut b.x)?;
        b.normed.resize(rows * s.hidden, 0.0);
        b.attended.resize(rows * q_row, 0.0);
        for (i, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&b.x, &layer.attn_norm, eps, &mut b.normed);
            layer.q.forward(&b.normed, rows, &mut b.q)?;
            layer.k.forward(&b.normed, rows, &mut b.k)?;
            layer.v.forward(&b.normed, rows, &mut b.v)?;
            let mut offset = 0;
            for step in steps.iter_mut() {
                let (pos, t) = (step.cache.len(), step.tokens.len());
                let q = &mut b.q[offset * q_row..(offset + t) * q_row];
                let k = &mut b.k[offset * kv_row..(offset + t) * kv_row];
                self.rope.apply(q, s.heads, pos);
                self.rope.apply(k, s.kv_heads, pos);
                let v = &b.v[offset * kv_row..(offset + t) * kv_row];
                step.cache.write(i, pos, k, v);
                let (keys, values) = step.cache.layer(i, pos + t);
                let out = &mut b.attended[offset * q_row..(offset + t) * q_row];
                attend(heads, q, keys, values, pos, out);
                offset += t;
            }
            layer.o.forward(&b.attended, rows, &mut b.projected)?;
            ops::add(&mut b.x, &b.projected);
            ops::rms_norm(&b.x, &layer.ffn_norm, eps, &mut b.normed);
            layer.gate.forward(&b.normed, rows, &mut b.gate)?;
            layer.up.forward(&b.normed, rows, &mut b.up)?;
            ops::silu_mul(&mut b.gate, &b.up);
            layer.down.forward(&b.gate, rows, &mut b.projected)?;
            ops::add(&mut b.x, &b.projected);
        }
        // Only each sequence's last row is needed beyond this point.
        b.last.clear();
        let mut end = 0;
        for step in steps.iter_mut() {
            end += step.tokens.len();
            b.last
                .extend_from_slice(&b.x[(end - 1) * s.hidden..end * s.hidden]);
            step.cache.advance(step.tokens.len());
        }
        b.normed.resize(b.last.len(), 0.0);
        ops::rms_norm(&b.last, &self.norm, eps, &mut b.normed[..b.last.len()]);
        logits.resize(steps.len() * s.vocab, 0.0);
        self.output
            .matmul(&b.normed[..b.last.len()], steps.len(), logits)
    }

    /// The longest sequence (prompt plus generated tokens) this instance accepts.
    pub fn context(&self) -> usize {
        self.rope.positions()
    }
}
