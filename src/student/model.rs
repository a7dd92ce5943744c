//! The decoder-only transformer behind `llama` and `qwen2` GGUF files.
//!
//! Every weight matrix, the token-embedding table included, stays in the GGUF's quantized
//! format in memory: embedding rows are dequantized only for the tokens being looked up.
//! That is what keeps duet's resident memory close to the file size (candle's reference
//! loaders expand the embedding table to f32, which more than doubles it for small models).
//! The forward pass works on plain `f32` rows in buffers reused from pass to pass (no
//! allocation per token): matrix products go to `kernels.rs` or candle's quantized kernels,
//! the rest to `ops.rs` and `attention.rs`. The key/value caches live outside the model
//! ([`KvCache`]), so one loaded model serves any number of sequences, several per pass.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::{DType, Device};

use super::attention::{Heads, attend};
use super::gguf::{Architecture, GgufHeader};
pub use super::kv_cache::KvCache;
use super::ops::{self, Rope, RopeLayout};
use super::weights::QuantMatrix;
use crate::error::DuetError;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub architecture: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    pub vocab: usize,
    /// The context the model was trained for.
    pub trained_context: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
}

impl ModelShape {
    pub fn from_header(h: &GgufHeader) -> Result<Self, DuetError> {
        let heads = h.arch_u32("attention.head_count")? as usize;
        let hidden = h.arch_u32("embedding_length")? as usize;
        let kv_heads = h
            .arch_u32("attention.head_count_kv")
            .map(|n| n as usize)
            .unwrap_or(heads);
        let head_dim = h
            .arch_u32("rope.dimension_count")
            .map(|n| n as usize)
            .unwrap_or(hidden / heads);
        let vocab = h
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| DuetError::ModelLoad("GGUF has no token_embd.weight".into()))?;
        let ffn = h
            .arch_u32("feed_forward_length")
            .map(|n| n as usize)
            .or_else(|_| {
                h.content
                    .tensor_infos
                    .get("blk.0.ffn_gate.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| DuetError::ModelLoad("GGUF has no feed-forward width".into()))
            })?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(DuetError::ModelLoad(format!(
                "impossible attention shape: {heads} heads over {kv_heads} key/value heads"
            )));
        }
        Ok(Self {
            architecture: h.architecture,
            layers: h.arch_u32("block_count")? as usize,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            trained_context: h.arch_u32("context_length").unwrap_or(2048) as usize,
            rms_eps: h
                .arch_f32("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f64,
            rope_theta: h.arch_f32("rope.freq_base").unwrap_or(10_000.0),
        })
    }

    /// Bytes of the activation buffers a forward pass over `rows` rows keeps (f32 rows of every
    /// layer output, the feed-forward's two halves, their 8-bit quantized copies for the
    /// kernels, and one row of logits per sequence for `sequences`).
    pub fn activation_bytes(&self, rows: usize, sequences: usize) -> usize {
        let q_row = self.heads * self.head_dim;
        let kv_row = self.kv_heads * self.head_dim;
        // Quantized activations take 256 bytes per 64 values of the widest input: as much as
        // that input in f32.
        let quantized = self.hidden.max(self.ffn);
        let per_row = 3 * self.hidden + 2 * q_row + 2 * kv_row + 2 * self.ffn + quantized;
        (rows * per_row + sequences * self.vocab) * 4
    }

    /// Bytes of key/value cache one token occupies across all layers (f16 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_heads * self.head_dim * 2 * DType::F16.size_in_bytes()
    }
}

/// A linear layer with quantized weights and, for qwen2's q/k/v, an f32 bias.
struct Linear {
    weight: QuantMatrix,
    bias: Option<Vec<f32>>,
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

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
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
    /// Loads the weights of a GGUF whose header (and shape) were already read; `context`
    /// bounds the rotary tables (and so the longest sequence this instance accepts).
    pub fn load(
        path: &Path,
        header: &GgufHeader,
        shape: ModelShape,
        context: usize,
    ) -> Result<Self, DuetError> {
        let file = File::open(path)
            .map_err(|e| DuetError::ModelLoad(format!("cannot open {}: {e}", path.display())))?;
        let mut src = TensorSource { header, file };
        let qkv_bias = shape.architecture == Architecture::Qwen2;
        let layers = (0..shape.layers)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Layer {
                    attn_norm: src.vector(&format!("{p}.attn_norm.weight"))?,
                    q: src.linear(&format!("{p}.attn_q"), qkv_bias)?,
                    k: src.linear(&format!("{p}.attn_k"), qkv_bias)?,
                    v: src.linear(&format!("{p}.attn_v"), qkv_bias)?,
                    o: src.linear(&format!("{p}.attn_output"), false)?,
                    ffn_norm: src.vector(&format!("{p}.ffn_norm.weight"))?,
                    gate: src.linear(&format!("{p}.ffn_gate"), false)?,
                    up: src.linear(&format!("{p}.ffn_up"), false)?,
                    down: src.linear(&format!("{p}.ffn_down"), false)?,
                })
            })
            .collect::<Result<Vec<_>, DuetError>>()?;
        let norm = src.vector("output_norm.weight")?;
        let embed = Arc::new(src.matrix("token_embd.weight")?);
        // Models with tied embeddings have no output.weight: the head shares the table.
        let output = if header.content.tensor_infos.contains_key("output.weight") {
            Arc::new(src.matrix("output.weight")?)
        } else {
            embed.clone()
        };
        // llama.cpp's converter permutes llama's q/k rows for interleaved rotation; qwen2
        // keeps the original halves layout.
        let layout = match shape.architecture {
            Architecture::Llama => RopeLayout::Interleaved,
            Architecture::Qwen2 => RopeLayout::Halves,
        };
        let rope = Rope::new(shape.head_dim, shape.rope_theta, context, layout);
        Ok(Self {
            shape,
            embed,
            layers,
            norm,
            output,
            rope,
            buffers: Mutex::new(Buffers::default()),
        })
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

/// Index of the largest logit (greedy decoding); used by tests and the sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Reads named tensors from an open GGUF, one at a time.
struct TensorSource<'a> {
    header: &'a GgufHeader,
    file: File,
}

impl<'a> TensorSource<'a> {
    fn info(&self, name: &str) -> Result<&'a TensorInfo, DuetError> {
        self.header
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| DuetError::ModelLoad(format!("the GGUF has no tensor {name}")))
    }

    /// A weight matrix, kept quantized.
    fn matrix(&mut self, name: &str) -> Result<QuantMatrix, DuetError> {
        let info = self.info(name)?;
        QuantMatrix::read(&mut self.file, info, self.header.content.tensor_data_offset)
            .map_err(|e| DuetError::ModelLoad(format!("tensor {name}: {e}")))
    }

    /// A small float vector (norm weights, biases), as f32 values.
    fn vector(&mut self, name: &str) -> Result<Vec<f32>, DuetError> {
        let info = self.info(name)?;
        info.read(
            &mut self.file,
            self.header.content.tensor_data_offset,
            &Device::Cpu,
        )
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| DuetError::ModelLoad(format!("tensor {name}: {e}")))
    }

    fn linear(&mut self, name: &str, with_bias: bool) -> Result<Linear, DuetError> {
        let weight = self.matrix(&format!("{name}.weight"))?;
        let bias = if with_bias {
            Some(self.vector(&format!("{name}.bias"))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}
