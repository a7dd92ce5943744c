//! Reading a GGUF file's header: typed access to its metadata and the facts duet needs
//! before it loads any weight (architecture, shapes, tokenizer, chat template).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
pub use candle_core::quantized::gguf_file::Value;

use crate::error::DuetError;
use crate::student::model::Architecture;

/// A GGUF file's header: metadata and tensor directory, no weights.
pub struct GgufHeader {
    pub content: Content,
    pub architecture: Architecture,
}

impl GgufHeader {
    /// Reads only the header; the weights stay on disk until the model is built.
    pub fn read(path: &Path) -> Result<Self, DuetError> {
        let file = File::open(path).map_err(|e| {
            DuetError::ModelLoad(format!("cannot open model file {}: {e}", path.display()))
        })?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| {
            DuetError::ModelLoad(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        let arch = string(&content.metadata, "general.architecture")?;
        let architecture = Architecture::parse(&arch)?;
        Ok(Self {
            content,
            architecture,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// An architecture-scoped integer such as `llama.block_count`.
    pub fn arch_u32(&self, key: &str) -> Result<u32, DuetError> {
        u32_value(
            self.metadata(),
            &format!("{}.{key}", self.architecture.key()),
        )
    }

    /// An architecture-scoped float such as `qwen2.rope.freq_base`.
    pub fn arch_f32(&self, key: &str) -> Option<f32> {
        let key = format!("{}.{key}", self.architecture.key());
        self.metadata().get(&key).and_then(|v| v.to_f32().ok())
    }

    /// Forgets the vocabulary arrays once the tokenizer has been built from them.
    pub fn drop_tokenizer_metadata(&mut self) {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
            "tokenizer.huggingface.json",
        ] {
            self.content.metadata.remove(key);
        }
        self.content.metadata.shrink_to_fit();
    }

    /// Total bytes of all tensors as stored (and as held in memory, since duet keeps them quantized).
    pub fn tensor_bytes(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| {
                let blocks = t.shape.elem_count() / t.ggml_dtype.block_size();
                (blocks * t.ggml_dtype.type_size()) as u64
            })
            .sum()
    }
}

/// A required string from the metadata.
pub fn string(md: &HashMap<String, Value>, key: &str) -> Result<String, DuetError> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(missing(key, "is not a string")),
        None => Err(missing(key, "is missing")),
    }
}

/// A required unsigned integer, whichever integer width the writer chose.
pub fn u32_value(md: &HashMap<String, Value>, key: &str) -> Result<u32, DuetError> {
    let v = md.get(key).ok_or_else(|| missing(key, "is missing"))?;
    let n = match v {
        Value::U8(n) => *n as i64,
        Value::I8(n) => *n as i64,
        Value::U16(n) => *n as i64,
        Value::I16(n) => *n as i64,
        Value::U32(n) => *n as i64,
        Value::I32(n) => *n as i64,
        Value::U64(n) => *n as i64,
        Value::I64(n) => *n,
        _ => return Err(missing(key, "is not an integer")),
    };
    u32::try_from(n).map_err(|_| missing(key, "is out of range"))
}

/// An optional float.
pub fn opt_f32(md: &HashMap<String, Value>, key: &str) -> Option<f32> {
    md.get(key).and_then(|v| v.to_f32().ok())
}

/// An optional unsigned integer.
pub fn opt_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.contains_key(key)
        .then(|| u32_value(md, key).ok())
        .flatten()
}

/// A required array of strings (vocabulary, merges).
pub fn strings<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>, DuetError> {
    let v = md.get(key).ok_or_else(|| missing(key, "is missing"))?;
    let items = v.to_vec().map_err(|_| missing(key, "is not an array"))?;
    items
        .iter()
        .map(|i| match i {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(missing(key, "holds a non-string")),
        })
        .collect()
}

fn missing(key: &str, what: &str) -> DuetError {
    DuetError::ModelLoad(format!("GGUF metadata `{key}` {what}"))
}
