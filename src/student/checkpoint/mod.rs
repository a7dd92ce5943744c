//! Hugging Face transformers checkpoints (config.json, safetensors, tokenizer files) as
//! student models: quantized while loading, tensor by tensor, into a GGUF that is cached, so
//! the next start loads that file through the same path as any other GGUF.
//!
//! - [`source`]: where the checkpoint is (a directory, or an `owner/repo` id in the hub cache);
//! - [`model_config`]: config.json: architecture and hyper-parameters;
//! - [`shards`]: the safetensors files, read a few rows at a time;
//! - [`lora`]: a PEFT LoRA adapter, merged into the rows as they are read;
//! - [`quantize`]: which type each tensor becomes, and quantizing rows on every core;
//! - [`metadata`]: the GGUF metadata: hyper-parameters, tokenizer, chat template, sampling;
//! - [`gguf_writer`]: the GGUF container, written front to back;
//! - [`convert`]: all of the above, one tensor at a time.

pub mod convert;
pub mod gguf_writer;
pub mod lora;
pub mod metadata;
pub mod model_config;
pub mod quantize;
pub mod shards;
pub mod source;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::config::{Quantization, StudentConfig};
use crate::error::DuetError;

/// Bumped whenever the GGUF duet writes for the same checkpoint would differ, so stale
/// cached conversions are not reused.
const CONVERTER_VERSION: &str = "1";

/// Whether `model` names a transformers checkpoint rather than a GGUF.
pub fn is_checkpoint(model: &str) -> bool {
    let path = Path::new(model);
    if path.is_dir() {
        return path.join("config.json").is_file();
    }
    !path.exists() && source::repo_id(model).is_some()
}

/// The GGUF for the checkpoint `config.model` names (with `config.lora_dir` merged, at
/// `config.quantization`): the cached conversion when there is one, else converted now,
/// unless the model would not fit `budget`: that is found from the header alone, before
/// anything is quantized.
pub fn prepare(config: &StudentConfig, budget: u64) -> Result<PathBuf, DuetError> {
    let dir = source::resolve(&config.model)?;
    let cache = cache_dir()?;
    remove_abandoned(&cache);
    let lora = (!config.lora_dir.is_empty()).then(|| PathBuf::from(&config.lora_dir));
    let cached = cache.join(cache_name(
        &config.model,
        &dir,
        lora.as_deref(),
        config.quantization,
    )?);
    if cached.is_file() {
        tracing::info!(path = %cached.display(), "using the checkpoint's cached conversion");
        return Ok(cached);
    }
    let fits = |header: &Path| crate::student::load::check_fits(header, config, budget);
    let report = convert::convert(&dir, lora.as_deref(), config.quantization, &cached, &fits)?;
    tracing::info!(
        path = %cached.display(),
        "{report}; kept for the next start (delete the file to reclaim the disk space)"
    );
    Ok(cached)
}

/// The last part of a path or repo id, a trailing slash allowed: `Qwen1.5-1.8B-Chat` of
/// `Qwen/Qwen1.5-1.8B-Chat` and of `/models/Qwen1.5-1.8B-Chat/`.
fn last_component(name: &str) -> &str {
    let name = name.trim_end_matches('/');
    name.rsplit('/').next().unwrap_or(name)
}

/// A JSON file of the checkpoint or adapter, as `T`; errors name the file.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DuetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DuetError::ModelLoad(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| DuetError::ModelLoad(format!("{}: {e}", path.display())))
}

/// Where converted checkpoints are kept: `$XDG_CACHE_HOME/duet/checkpoints`, else
/// `~/.cache/duet/checkpoints`.
fn cache_dir() -> Result<PathBuf, DuetError> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| {
            DuetError::ModelLoad("neither XDG_CACHE_HOME nor HOME is set: no cache directory for the converted checkpoint".into())
        })?;
    let dir = base.join("duet").join("checkpoints");
    std::fs::create_dir_all(&dir)
        .map_err(|e| DuetError::ModelLoad(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Deletes conversions a killed process left half written: a file still being written is
/// modified every moment, so one untouched for ten minutes is nobody's.
fn remove_abandoned(cache: &Path) {
    let abandoned = |entry: &std::fs::DirEntry| {
        entry
            .file_name()
            .to_string_lossy()
            .ends_with(convert::PARTIAL_SUFFIX)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 600)
    };
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        if abandoned(&entry) {
            tracing::info!(path = %entry.path().display(), "removing an abandoned conversion");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The cached file's name: readable, and keyed by everything that shapes its contents (the
/// checkpoint's and adapter's files by name, size and modification time, the type, the
/// converter), so a changed checkpoint is converted again.
fn cache_name(
    model: &str,
    dir: &Path,
    lora: Option<&Path>,
    quantization: Quantization,
) -> Result<String, DuetError> {
    let mut hash = Sha256::new();
    hash.update(CONVERTER_VERSION);
    hash.update(env!("CARGO_PKG_VERSION"));
    hash.update(quantization.name());
    for folder in std::iter::once(dir).chain(lora) {
        hash.update(
            folder
                .canonicalize()
                .unwrap_or(folder.into())
                .as_os_str()
                .as_encoded_bytes(),
        );
        for (name, len, modified) in file_stamps(folder)? {
            hash.update(format!("{name}\0{len}\0{modified}\0"));
        }
    }
    let digest: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let readable: String = last_component(model)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let adapter = if lora.is_some() { "-lora" } else { "" };
    Ok(format!(
        "{readable}{adapter}-{}-{digest}.gguf",
        quantization.name()
    ))
}

/// Name, size and modification time of each file in `dir`, sorted by name.
fn file_stamps(dir: &Path) -> Result<Vec<(String, u64, u128)>, DuetError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DuetError::ModelLoad(format!("cannot read {}: {e}", dir.display())))?;
    let mut stamps = Vec::new();
    for entry in entries.flatten() {
        // Hub snapshots hold symbolic links to blobs: follow them.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        stamps.push((
            entry.file_name().to_string_lossy().into_owned(),
            meta.len(),
            modified,
        ));
    }
    stamps.sort();
    Ok(stamps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_name_changes_with_the_type_and_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let name = |q| cache_name("Qwen/Qwen1.5-1.8B-Chat", dir.path(), None, q).unwrap();
        let four = name(Quantization::Q4KM);
        assert!(four.starts_with("Qwen1.5-1.8B-Chat-q4_k_m-"), "{four}");
        assert_ne!(four, name(Quantization::Q8_0));
        std::fs::write(dir.path().join("config.json"), "{\"changed\": 1}").unwrap();
        assert_ne!(four, name(Quantization::Q4KM));
    }
}
