//! Building the model from a GGUF file: its shape from the header, then its tensors, read
//! one at a time straight into the buffers that are kept (weight matrices stay quantized).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file::TensorInfo;

use super::gguf::GgufHeader;
use crate::error::DuetError;
use crate::student::model::ops::{Rope, RopeLayout};
use crate::student::model::transformer::{Layer, Linear, Transformer};
use crate::student::model::weights::QuantMatrix;
use crate::student::model::{Architecture, ModelShape};

/// The model's shape, from its GGUF header.
pub fn read_shape(h: &GgufHeader) -> Result<ModelShape, DuetError> {
    let heads = h.arch_u32("attention.head_count")? as usize;
    let hidden = h.arch_u32("embedding_length")? as usize;
    let kv_heads = h
        .arch_u32("attention.head_count_kv")
        .map(|n| n as usize)
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(DuetError::ModelLoad(format!(
            "impossible attention shape: {heads} heads over {kv_heads} key/value heads"
        )));
    }
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
    Ok(ModelShape {
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

/// Reads the weights of a GGUF whose header (and shape) were already read; `context`
/// bounds the rotary tables (and so the longest sequence this instance accepts).
pub fn read_transformer(
    path: &Path,
    header: &GgufHeader,
    shape: ModelShape,
    context: usize,
) -> Result<Transformer, DuetError> {
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
    Ok(Transformer::new(shape, embed, layers, norm, output, rope))
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
