//! Converting a transformers checkpoint into a quantized GGUF, one tensor at a time and a
//! few rows at a time within each: read (f16/bf16/f32 → f32), merge the LoRA delta, put
//! llama's query/key rows in the order llama.cpp's GGUFs use, quantize on every core, write.
//! At any moment memory holds one chunk of rows and its quantized blocks, never a whole
//! float model nor a whole quantized one: the file is written as it is produced.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::time::Instant;

use super::gguf_writer::{self, TensorEntry};
use super::lora::Adapter;
use super::metadata;
use super::model_config::ModelConfig;
use super::quantize::{self, Role};
use super::shards::Shards;
use crate::config::Quantization;
use crate::error::DuetError;
use crate::memory::human;
use crate::student::model::Architecture;

/// How a GGUF being written is named until it is complete.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Values read and quantized at once: 16 MiB of f32, enough to keep every core busy.
const CHUNK_VALUES: usize = 4 << 20;

/// What a conversion did, for the log and `duet quantize`.
#[derive(Debug, Clone)]
pub struct Report {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub peak_rss: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "quantized {} tensors into {} in {:.1} s (peak RSS of the process {})",
            self.tensors,
            human(self.bytes),
            self.seconds,
            human(self.peak_rss)
        )
    }
}

/// One tensor to write: where it comes from, what it becomes.
struct Planned {
    source: String,
    entry: TensorEntry,
    /// llama's query/key weights: the head count whose rows are reordered.
    permute_heads: Option<usize>,
}

/// Checks a GGUF whose header alone is written (the memory budget, say) before any weight
/// is quantized.
pub type HeaderCheck<'a> = &'a dyn Fn(&Path) -> Result<(), DuetError>;

/// Converts the checkpoint in `dir` (with the adapter in `lora` merged) to a GGUF at `out`,
/// written beside it first and renamed into place when complete; `check` may refuse it once
/// its header is written.
pub fn convert(
    dir: &Path,
    lora: Option<&Path>,
    quantization: Quantization,
    out: &Path,
    check: HeaderCheck,
) -> Result<Report, DuetError> {
    let started = Instant::now();
    let config = ModelConfig::read(dir)?;
    let shards = Shards::open_checkpoint(dir)?;
    let adapter = lora.map(|l| Adapter::open(l, &shards)).transpose()?;
    let name = display_name(dir, &config);
    if let Some(adapter) = &adapter {
        adapter.warn_if_other_base(&[&config.name_or_path, &name]);
    }
    let plan = plan(&config, &shards, quantization)?;
    let vocab_rows = plan[0].entry.shape[0];
    let metadata = metadata::build(dir, &config, vocab_rows, quantization, &name)?;
    let bytes: u64 = plan.iter().map(|p| p.entry.bytes()).sum();
    tracing::info!(
        checkpoint = %dir.display(),
        ?quantization,
        lora = ?lora.map(Path::display),
        "quantizing {name} ({} tensors) into {} of weights",
        plan.len(),
        human(bytes)
    );

    // A file of its own beside `out` (another process, a replica sharing the cache, may be
    // writing the same GGUF), deleted if anything fails, renamed into place when complete.
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let leaf = out
        .file_name()
        .map_or("model.gguf".into(), |n| n.to_string_lossy());
    let mut partial = tempfile::Builder::new()
        .prefix(&format!(".{leaf}."))
        .suffix(PARTIAL_SUFFIX)
        .tempfile_in(folder)
        .map_err(|e| DuetError::ModelLoad(format!("cannot write in {}: {e}", folder.display())))?;
    let path = partial.path().to_path_buf();
    write_gguf(
        partial.as_file_mut(),
        &path,
        metadata,
        &plan,
        &shards,
        adapter.as_ref(),
        check,
    )?;
    // A temporary file is private to its owner; the model is an ordinary file.
    let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    let _ = partial.as_file().set_permissions(readable);
    partial.persist(out).map_err(|e| {
        DuetError::ModelLoad(format!(
            "cannot move {} to {}: {e}",
            path.display(),
            out.display()
        ))
    })?;
    Ok(Report {
        tensors: plan.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss: crate::memory::peak_rss_bytes(),
    })
}

/// Writes the whole GGUF into `file` (at `path`), synced to disk.
fn write_gguf(
    file: &mut File,
    path: &Path,
    metadata: Vec<(String, gguf_writer::MetaValue)>,
    plan: &[Planned],
    shards: &Shards,
    adapter: Option<&Adapter>,
    check: HeaderCheck,
) -> Result<(), DuetError> {
    let io = |e: std::io::Error| DuetError::ModelLoad(format!("writing {}: {e}", path.display()));
    let mut file = BufWriter::with_capacity(1 << 20, file);
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    gguf_writer::write_header(&mut file, &metadata, &entries).map_err(io)?;
    // The vocabulary in it is megabytes: gone before the weights are read.
    drop(metadata);
    gguf_writer::pad(&mut file).map_err(io)?;
    file.flush().map_err(io)?;
    check(path)?;
    // A log line each tenth of the way: a 7B checkpoint takes minutes.
    let total: u64 = plan.iter().map(|p| p.entry.bytes()).sum();
    let (mut done, mut next_tenth) = (0, 1);
    for tensor in plan {
        write_tensor(shards, adapter, tensor, &mut file)?;
        gguf_writer::pad(&mut file).map_err(io)?;
        done += tensor.entry.bytes();
        let tenths = done * 10 / total.max(1);
        if tenths >= next_tenth && tenths < 10 {
            tracing::info!("quantized {}%", tenths * 10);
            next_tenth = tenths + 1;
        }
    }
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// The model's name for GGUF metadata: the directory's, or the hub repo's for a snapshot.
fn display_name(dir: &Path, config: &ModelConfig) -> String {
    let is_snapshot = dir
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|p| p == "snapshots");
    if is_snapshot
        && let Some(repo) = dir
            .ancestors()
            .nth(2)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("models--"))
    {
        return repo.replacen("--", "/", 1);
    }
    dir.canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| config.name_or_path.clone())
}

/// Every tensor of the GGUF, checked against the shapes config.json implies.
fn plan(
    config: &ModelConfig,
    shards: &Shards,
    quantization: Quantization,
) -> Result<Vec<Planned>, DuetError> {
    let (hidden, heads, kv_heads, head_dim) = (
        config.hidden_size,
        config.num_attention_heads,
        config.kv_heads(),
        config.head_dim(),
    );
    let n = config.num_hidden_layers;
    let qwen = config.arch() == Architecture::Qwen2;
    let llama = !qwen;
    let tied = config.tie_word_embeddings || shards.get("lm_head.weight").is_none();
    let mut plan = Vec::new();
    let mut add = |source: String,
                   name: String,
                   shape: Vec<usize>,
                   role: Role,
                   permute_heads: Option<usize>| {
        let stored = shards.get(&source).ok_or_else(|| {
            DuetError::ModelLoad(format!("the checkpoint has no tensor {source}"))
        })?;
        let file = shards.path_of(stored).display();
        if stored.shape != shape || shape.contains(&0) {
            return Err(DuetError::ModelLoad(format!(
                "{file}: tensor {source} is {:?}, config.json implies {shape:?}",
                stored.shape
            )));
        }
        if stored.value_width().is_none() {
            return Err(DuetError::ModelLoad(format!(
                "{file}: tensor {source} is {:?}; duet reads F32, F16 and BF16 checkpoints",
                stored.dtype
            )));
        }
        let cols = *shape.last().expect("shapes are not empty");
        plan.push(Planned {
            source,
            entry: TensorEntry {
                dtype: quantize::tensor_type(quantization, role, cols),
                name,
                shape,
            },
            permute_heads,
        });
        Ok::<(), DuetError>(())
    };
    // The vocabulary is the tables' own row count: config.json's vocab_size may round it.
    let rows_of = |name: &str| shards.get(name).and_then(|t| t.shape.first().copied());
    let vocab = rows_of("model.embed_tokens.weight").unwrap_or(0);
    let embedding_role = if tied { Role::Head } else { Role::Embedding };
    add(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![vocab, hidden],
        embedding_role,
        None,
    )?;
    let (q, kv, ffn) = (
        heads * head_dim,
        kv_heads * head_dim,
        config.intermediate_size,
    );
    // llama.cpp reorders llama's query and key rows by head.
    let (q_heads, k_heads) = (llama.then_some(heads), llama.then_some(kv_heads));
    for i in 0..n {
        // One row per tensor: transformers' name, GGUF's, shape, role, heads to reorder.
        #[rustfmt::skip]
        let mut block = vec![
            ("input_layernorm.weight", "attn_norm.weight", vec![hidden], Role::Vector, None),
            ("self_attn.q_proj.weight", "attn_q.weight", vec![q, hidden], Role::OtherMatrix, q_heads),
            ("self_attn.k_proj.weight", "attn_k.weight", vec![kv, hidden], Role::OtherMatrix, k_heads),
            ("self_attn.v_proj.weight", "attn_v.weight", vec![kv, hidden], Role::Value { i, n }, None),
            ("self_attn.o_proj.weight", "attn_output.weight", vec![hidden, q], Role::OtherMatrix, None),
            ("post_attention_layernorm.weight", "ffn_norm.weight", vec![hidden], Role::Vector, None),
            ("mlp.gate_proj.weight", "ffn_gate.weight", vec![ffn, hidden], Role::OtherMatrix, None),
            ("mlp.up_proj.weight", "ffn_up.weight", vec![ffn, hidden], Role::OtherMatrix, None),
            ("mlp.down_proj.weight", "ffn_down.weight", vec![hidden, ffn], Role::Down { i, n }, None),
        ];
        if qwen {
            #[rustfmt::skip]
            block.extend([
                ("self_attn.q_proj.bias", "attn_q.bias", vec![q], Role::Vector, None),
                ("self_attn.k_proj.bias", "attn_k.bias", vec![kv], Role::Vector, None),
                ("self_attn.v_proj.bias", "attn_v.bias", vec![kv], Role::Vector, None),
            ]);
        }
        for (hf, gguf, shape, role, permute) in block {
            add(
                format!("model.layers.{i}.{hf}"),
                format!("blk.{i}.{gguf}"),
                shape,
                role,
                permute,
            )?;
        }
    }
    add(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![hidden],
        Role::Vector,
        None,
    )?;
    if !tied {
        add(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![rows_of("lm_head.weight").unwrap_or(0), hidden],
            Role::Head,
            None,
        )?;
    }
    Ok(plan)
}

/// Reads, merges, reorders, quantizes and writes one tensor, a chunk of rows at a time.
fn write_tensor(
    shards: &Shards,
    adapter: Option<&Adapter>,
    tensor: &Planned,
    out: &mut (impl Write + Seek),
) -> Result<(), DuetError> {
    let stored = shards.get(&tensor.source).expect("planned from the shards");
    let (rows, cols) = stored.rows_cols();
    // Reordering works within a head, so chunks hold whole heads.
    let group = tensor.permute_heads.map_or(1, |heads| rows / heads);
    let chunk_rows = (CHUNK_VALUES / cols / group).max(1) * group;
    let mut buffer = vec![0.0f32; chunk_rows.min(rows) * cols];
    let mut reordered = if tensor.permute_heads.is_some() {
        buffer.clone()
    } else {
        Vec::new()
    };
    let (mut first, mut written) = (0, 0);
    while first < rows {
        let count = chunk_rows.min(rows - first);
        let values = &mut buffer[..count * cols];
        shards.read_rows(&tensor.source, stored, first, values)?;
        if let Some(adapter) = adapter {
            adapter.add_to_rows(&tensor.source, first, cols, values);
        }
        let values: &[f32] = if tensor.permute_heads.is_some() {
            let target = &mut reordered[..count * cols];
            interleave_halves(values, target, group, cols);
            target
        } else {
            values
        };
        written +=
            quantize::write_quantized(tensor.entry.dtype, values, cols, out).map_err(|e| {
                DuetError::ModelLoad(format!("writing tensor {}: {e}", tensor.entry.name))
            })?;
        first += count;
    }
    // The header promised this many bytes: every later tensor's offset depends on it.
    if written as u64 != tensor.entry.bytes() {
        return Err(DuetError::Internal(format!(
            "tensor {} came to {written} bytes, not the {} its header entry gives",
            tensor.entry.name,
            tensor.entry.bytes()
        )));
    }
    Ok(())
}

/// llama.cpp's query/key row order: transformers keeps each head's rotary pairs as two
/// halves (row `j` pairs with `j + d/2`); GGUF interleaves them (row `2j` with `2j + 1`).
fn interleave_halves(from: &[f32], to: &mut [f32], head_dim: usize, cols: usize) {
    let half = head_dim / 2;
    for (src, dst) in from
        .chunks_exact(head_dim * cols)
        .zip(to.chunks_exact_mut(head_dim * cols))
    {
        for j in 0..half {
            for t in 0..2 {
                let from_row = t * half + j;
                let to_row = 2 * j + t;
                dst[to_row * cols..][..cols].copy_from_slice(&src[from_row * cols..][..cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_become_interleaved_pairs() {
        // One head of 4 rows, 1 column: halves [a b | c d] pair a-c and b-d.
        let mut to = vec![0.0; 8];
        interleave_halves(&[0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0], &mut to, 4, 1);
        assert_eq!(to, vec![0.0, 2.0, 1.0, 3.0, 10.0, 12.0, 11.0, 13.0]);
    }
}
