//! The decoder-only transformer behind `llama` and `qwen2` GGUF files, run with candle.
//!
//! Every weight matrix, the token-embedding table included, stays in the GGUF's quantized
//! format in memory: embedding rows are dequantized only for the tokens being looked up.
//! That is what keeps duet's resident memory close to the file size (candle's reference
//! loaders expand the embedding table to f32, which more than doubles it for small models).
//! The key/value cache lives outside the model in [`KvCache`], so one loaded model can
//! serve any number of sequences.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::{DType, Device, Tensor};

use super::gguf::{Architecture, GgufHeader};
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
            vocab,
            trained_context: h.arch_u32("context_length").unwrap_or(2048) as usize,
            rms_eps: h
                .arch_f32("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f64,
            rope_theta: h.arch_f32("rope.freq_base").unwrap_or(10_000.0),
        })
    }

    /// Bytes of key/value cache one token occupies across all layers (f32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_heads * self.head_dim * 2 * DType::F32.size_in_bytes()
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }
}

/// A linear layer with quantized weights and, for qwen2's q/k/v, an f32 bias.
struct Linear {
    weight: QuantMatrix,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.matmul(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Per-sequence key/value cache: one (keys, values) pair per layer, grown as tokens arrive,
/// so its memory is what the sequence actually uses.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// A loaded model: quantized weights and rotary tables, shareable across sequences.
pub struct Transformer {
    pub shape: ModelShape,
    embed: Arc<QuantMatrix>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Arc<QuantMatrix>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
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
        let mut src = TensorSource {
            header,
            file,
            device: Device::Cpu,
            eps: shape.rms_eps,
        };
        let qkv_bias = shape.architecture == Architecture::Qwen2;
        let layers = (0..shape.layers)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Layer {
                    attn_norm: src.norm(&format!("{p}.attn_norm"))?,
                    q: src.linear(&format!("{p}.attn_q"), qkv_bias)?,
                    k: src.linear(&format!("{p}.attn_k"), qkv_bias)?,
                    v: src.linear(&format!("{p}.attn_v"), qkv_bias)?,
                    o: src.linear(&format!("{p}.attn_output"), false)?,
                    ffn_norm: src.norm(&format!("{p}.ffn_norm"))?,
                    gate: src.linear(&format!("{p}.ffn_gate"), false)?,
                    up: src.linear(&format!("{p}.ffn_up"), false)?,
                    down: src.linear(&format!("{p}.ffn_down"), false)?,
                })
            })
            .collect::<Result<Vec<_>, DuetError>>()?;
        let norm = src.norm("output_norm")?;
        let embed = Arc::new(src.matrix("token_embd.weight")?);
        // Models with tied embeddings have no output.weight: the head shares the table.
        let output = if header.content.tensor_infos.contains_key("output.weight") {
            Arc::new(src.matrix("output.weight")?)
        } else {
            embed.clone()
        };
        let device = src.device;
        let (cos, sin) = rotary_tables(shape.head_dim, shape.rope_theta, context, &device)?;
        Ok(Self {
            shape,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            device,
        })
    }

    /// Runs `tokens` (the next positions of the sequence held in `cache`) through the
    /// model and returns the logits of the last one, as a `vocab`-long vector.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        let pos = cache.len;
        let t = tokens.len();
        let mut x = self.embed.rows(tokens)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = (t > 1)
            .then(|| causal_mask(t, pos, &self.device))
            .transpose()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(i, layer, &h, pos, &cos, &sin, mask.as_ref(), cache)?;
            let x1 = (h + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let h = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (layer.down.forward(&h)? + &x1)?;
        }
        cache.len += t;
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.output.matmul(&self.norm.forward(&last)?)?;
        logits.flatten_all()?.to_vec1::<f32>()
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        pos: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let s = &self.shape;
        let (b, t, _) = x.dims3()?;
        let heads = |lin: &Linear, n: usize| -> candle_core::Result<Tensor> {
            lin.forward(x)?
                .reshape((b, t, n, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self.rope(&heads(&layer.q, s.heads)?, cos, sin)?;
        let k = self.rope(&heads(&layer.k, s.kv_heads)?, cos, sin)?;
        let v = heads(&layer.v, s.kv_heads)?;
        let (k, v) = cache.append(index, k, v)?;
        let kv_len = pos + t;
        // Grouped-query attention without copying keys: the query heads that share a
        // key/value head are stacked along the sequence axis of that head.
        let group = s.heads / s.kv_heads;
        let q = q.reshape((b, s.kv_heads, group * t, s.head_dim))?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att
                .reshape((b, s.kv_heads, group, t, kv_len))?
                .broadcast_add(mask)?
                .reshape((b, s.kv_heads, group * t, kv_len))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // (b, kv_heads, group * t, head_dim)
        let y = y
            .reshape((b, s.heads, t, s.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, s.heads * s.head_dim))?;
        layer.o.forward(&y)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        // llama.cpp's converter permutes llama's q/k rows for interleaved rotation; qwen2
        // keeps the original halves layout (llama.cpp's "neox" rope).
        match self.shape.architecture {
            Architecture::Llama => candle_nn::rotary_emb::rope_i(x, cos, sin),
            Architecture::Qwen2 => candle_nn::rotary_emb::rope(x, cos, sin),
        }
    }

    /// The longest sequence (prompt plus generated tokens) this instance accepts.
    pub fn context(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }
}

fn rotary_tables(
    head_dim: usize,
    theta: f32,
    context: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), DuetError> {
    let inv_freq: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let half = inv_freq.len();
    let build = || -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, context as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((context, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok((freqs.cos()?, freqs.sin()?))
    };
    build().map_err(load_err)
}

/// Additive mask for `t` new queries after `pos` cached positions: -inf above the diagonal.
fn causal_mask(t: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let kv_len = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..kv_len).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, kv_len), device)
}

fn load_err(e: candle_core::Error) -> DuetError {
    DuetError::ModelLoad(e.to_string())
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
    device: Device,
    eps: f64,
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

    /// A small float vector (norm weights, biases) as an f32 tensor.
    fn vector(&mut self, name: &str) -> Result<Tensor, DuetError> {
        let info = self.info(name)?;
        info.read(
            &mut self.file,
            self.header.content.tensor_data_offset,
            &self.device,
        )
        .and_then(|q| q.dequantize(&self.device))
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

    fn norm(&mut self, name: &str) -> Result<RmsNorm, DuetError> {
        Ok(RmsNorm {
            weight: self.vector(&format!("{name}.weight"))?,
            eps: self.eps,
        })
    }
}
