//! Transformers checkpoints made from the test GGUFs, the way a converter back to Hugging Face
//! format would: every tensor dequantized and stored as f16 safetensors (llama's query/key
//! rows put back in transformers' order), config.json and the tokenizer files from the GGUF's
//! metadata. Also LoRA adapters, and the checkpoint with an adapter merged by hand.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use safetensors::{Dtype, View};
use serde_json::json;

/// A tensor kept as f32 values with its transformers shape.
pub struct Weight {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every weight of `gguf` under its transformers name, llama's q/k rows in transformers' order.
pub fn weights_of(gguf: &Path) -> (Content, HashMap<String, Weight>) {
    let mut file = BufReader::new(File::open(gguf).unwrap());
    let content = Content::read(&mut file).unwrap();
    let md = &content.metadata;
    let arch = md["general.architecture"].to_string().unwrap().clone();
    let int = |k: &str| md[&format!("{arch}.{k}")].to_u32().unwrap() as usize;
    let (heads, kv_heads) = (int("attention.head_count"), int("attention.head_count_kv"));
    let mut weights = HashMap::new();
    for (name, info) in &content.tensor_infos {
        let tensor = info
            .read(&mut file, content.tensor_data_offset, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let shape = tensor.dims().to_vec();
        let mut values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hf = hf_name(name);
        if arch == "llama" && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let n = if name.ends_with("attn_q.weight") {
                heads
            } else {
                kv_heads
            };
            values = halves_from_interleaved(&values, shape[0] / n, shape[1]);
        }
        weights.insert(hf, Weight { shape, values });
    }
    (content, weights)
}

/// transformers' name for a GGUF tensor name.
fn hf_name(gguf: &str) -> String {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, hf)) = fixed.iter().find(|(g, _)| *g == gguf) {
        return hf.to_string();
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ]
    .iter()
    .find_map(|(g, h)| part.strip_prefix(g).map(|suffix| format!("{h}{suffix}")))
    .unwrap_or_else(|| panic!("unknown tensor {gguf}"));
    format!("model.layers.{layer}.{part}")
}

/// Undoes llama.cpp's interleaving of each head's rotary pairs.
fn halves_from_interleaved(values: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for (src, dst) in values
        .chunks_exact(head_dim * cols)
        .zip(out.chunks_exact_mut(head_dim * cols))
    {
        for j in 0..half {
            for t in 0..2 {
                let (gguf_row, hf_row) = (2 * j + t, t * half + j);
                dst[hf_row * cols..][..cols].copy_from_slice(&src[gguf_row * cols..][..cols]);
            }
        }
    }
    out
}

/// A weight's bytes as safetensors stores them.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn new(w: &Weight, dtype: Dtype) -> Self {
        let bytes = match dtype {
            Dtype::F32 => w.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => w
                .values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => w
                .values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            other => panic!("{other:?}"),
        };
        Self {
            dtype,
            shape: w.shape.clone(),
            bytes,
        }
    }
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `weights` as safetensors in two shards with their index, as `dtype` except those
/// named in `full_precision`, kept f32.
pub fn write_weights(
    dir: &Path,
    weights: &HashMap<String, Weight>,
    dtype: Dtype,
    full_precision: &[String],
) {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let shards = [&names[..half], &names[half..]];
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let tensors: Vec<(String, Raw)> = shard
            .iter()
            .map(|n| {
                let w = &weights[*n];
                let stored = if full_precision.contains(n) {
                    Dtype::F32
                } else {
                    dtype
                };
                ((*n).clone(), Raw::new(w, stored))
            })
            .collect();
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.clone(), t)),
            None,
            &dir.join(&file),
        )
        .unwrap();
        for n in *shard {
            weight_map.insert((*n).clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A transformers checkpoint in `dir` made from the GGUF at `gguf`, its weights stored as
/// `dtype` (F16 or BF16, as models are published).
pub fn make_checkpoint(gguf: &Path, dir: &Path, dtype: Dtype) -> HashMap<String, Weight> {
    let (content, weights) = weights_of(gguf);
    std::fs::create_dir_all(dir).unwrap();
    write_weights(dir, &weights, dtype, &[]);
    write_model_files(&content, dir, !weights.contains_key("lm_head.weight"));
    weights
}

/// config.json, tokenizer.json, tokenizer_config.json and generation_config.json.
pub fn write_model_files(content: &Content, dir: &Path, tied: bool) {
    let md = &content.metadata;
    let arch = md["general.architecture"].to_string().unwrap().clone();
    let int = |k: &str| md[&format!("{arch}.{k}")].to_u32().unwrap();
    let float = |k: &str| md[&format!("{arch}.{k}")].to_f32().unwrap();
    let vocab = content.tensor_infos["token_embd.weight"].shape.dims()[0];
    let config = json!({
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": arch,
        "hidden_size": int("embedding_length"),
        "intermediate_size": int("feed_forward_length"),
        "num_hidden_layers": int("block_count"),
        "num_attention_heads": int("attention.head_count"),
        "num_key_value_heads": int("attention.head_count_kv"),
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon"),
        "rope_theta": float("rope.freq_base"),
        "max_position_embeddings": int("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let tokenizer = duet::student::load::vocabulary::from_gguf_metadata(md).unwrap();
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let template = match md.get("tokenizer.chat_template") {
        Some(Value::String(s)) => s.clone(),
        _ => panic!("the test GGUF has a chat template"),
    };
    let eos = id("tokenizer.ggml.eos_token_id");
    let tokenizer_config = json!({
        "bos_token": text(id("tokenizer.ggml.bos_token_id")),
        "eos_token": text(eos),
        "add_bos_token": false,
        "chat_template": template,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    let generation = json!({"eos_token_id": eos, "do_sample": false});
    std::fs::write(dir.join("generation_config.json"), generation.to_string()).unwrap();
}

/// A rank-1 LoRA adapter on `modules` of every layer, in PEFT's layout, whose delta is
/// exactly representable (powers of two times small integers) so merging it in f32 is exact
/// in any order; returns the deltas by weight name.
pub fn make_lora(
    dir: &Path,
    weights: &HashMap<String, Weight>,
    modules: &[&str],
    alpha: f32,
) -> HashMap<String, Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    let scale = alpha; // r = 1
    let mut tensors: Vec<(String, Weight)> = Vec::new();
    let mut deltas = HashMap::new();
    for (name, w) in weights {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !modules.iter().any(|m| module.ends_with(m)) || w.shape.len() != 2 {
            continue;
        }
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let a: Vec<f32> = (0..cols)
            .map(|c| ((c * 7 % 5) as f32 - 2.0) / 64.0)
            .collect();
        let b: Vec<f32> = (0..rows)
            .map(|r| ((r * 3 % 7) as f32 - 3.0) / 64.0)
            .collect();
        let delta = b
            .iter()
            .flat_map(|&bv| a.iter().map(move |&av| (scale * bv) * av))
            .collect();
        deltas.insert(name.clone(), delta);
        let peft = format!("base_model.model.{module}");
        tensors.push((
            format!("{peft}.lora_A.weight"),
            Weight {
                shape: vec![1, cols],
                values: a,
            },
        ));
        tensors.push((
            format!("{peft}.lora_B.weight"),
            Weight {
                shape: vec![rows, 1],
                values: b,
            },
        ));
    }
    let f32_tensors: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(n, w)| (n.clone(), Raw::new(w, Dtype::F32)))
        .collect();
    safetensors::serialize_to_file(
        f32_tensors.iter().map(|(n, t)| (n.clone(), t)),
        None,
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = json!({
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": alpha,
        "target_modules": modules,
        "use_rslora": false,
        "fan_in_fan_out": false,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "test-checkpoint",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    deltas
}

/// The checkpoint `weights` (as its f16 files hold them) with `deltas` added, written in
/// `dir` beside a copy of `model_files`' config and tokenizer files; adapted weights are kept
/// f32 so the sum is exactly what merging the adapter computes.
pub fn write_merged(
    dir: &Path,
    model_files: &Path,
    weights: &HashMap<String, Weight>,
    deltas: &HashMap<String, Vec<f32>>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut merged = HashMap::new();
    for (name, w) in weights {
        let mut values: Vec<f32> = w
            .values
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        if let Some(delta) = deltas.get(name) {
            values.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
        }
        merged.insert(
            name.clone(),
            Weight {
                shape: w.shape.clone(),
                values,
            },
        );
    }
    let adapted: Vec<String> = deltas.keys().cloned().collect();
    write_weights(dir, &merged, Dtype::F16, &adapted);
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(model_files.join(file), dir.join(file)).unwrap();
    }
}
