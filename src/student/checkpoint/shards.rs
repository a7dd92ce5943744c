//! A checkpoint's safetensors files (one, or shards listed by `model.safetensors.index.json`):
//! their tensor directories, and rows read as f32 a few at a time. Rows are read with
//! positioned reads rather than through a memory map: pages of a mapped file that were read
//! stay in the process's resident set until unmapped, so a mapped multi-gigabyte checkpoint
//! would show up whole in peak RSS, which is what loading must keep small.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::error::DuetError;

/// The files named by a sharded checkpoint's index, each once, in order.
pub fn index_files(index: &Path) -> Result<Vec<String>, DuetError> {
    let json: serde_json::Value = super::read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| DuetError::ModelLoad(format!("{} has no weight_map", index.display())))?;
    let mut files: Vec<String> = Vec::new();
    for file in map.values().filter_map(|v| v.as_str()) {
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    Ok(files)
}

/// One tensor: where it is and how it is stored.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first value in its file.
    start: u64,
}

impl StoredTensor {
    /// Bytes per value, for the types duet reads (F32, F16, BF16).
    pub fn value_width(&self) -> Option<usize> {
        match self.dtype {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            _ => None,
        }
    }

    /// `(rows, cols)` of a matrix, `(1, n)` of a vector.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [n] => (1, *n),
            [rows, cols] => (*rows, *cols),
            _ => (0, 0),
        }
    }
}

/// The open safetensors files of one checkpoint (or adapter).
pub struct Shards {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, StoredTensor>,
}

impl Shards {
    /// Opens the checkpoint in `dir`: the index's shards, else `model.safetensors`.
    pub fn open_checkpoint(dir: &Path) -> Result<Self, DuetError> {
        let index = dir.join("model.safetensors.index.json");
        let names = if index.is_file() {
            index_files(&index)?
        } else {
            vec!["model.safetensors".to_string()]
        };
        Self::open(&names.iter().map(|n| dir.join(n)).collect::<Vec<_>>())
    }

    /// Opens `paths` and reads their headers.
    pub fn open(paths: &[PathBuf]) -> Result<Self, DuetError> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for path in paths {
            let fail = |why: String| DuetError::ModelLoad(format!("{}: {why}", path.display()));
            let mut file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
            let mut len = [0u8; 8];
            file.read_exact(&mut len)
                .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
            let header_len = u64::from_le_bytes(len);
            let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
            if header_len > 100 << 20 || 8 + header_len > file_len {
                return Err(fail(
                    "not a safetensors file: impossible header length".into(),
                ));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header)
                .map_err(|e| fail(format!("truncated header: {e}")))?;
            let metadata: Metadata = serde_json::from_slice(&header)
                .map_err(|e| fail(format!("invalid safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            if data_start + metadata.data_len() as u64 > file_len {
                return Err(fail(
                    "tensor data runs past the end of the file (truncated download?)".into(),
                ));
            }
            for (name, info) in metadata.tensors() {
                tensors.insert(
                    name,
                    StoredTensor {
                        file: files.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + info.data_offsets.0 as u64,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The file `tensor` lives in, for messages.
    pub fn path_of(&self, tensor: &StoredTensor) -> &Path {
        &self.files[tensor.file].0
    }

    /// Rows `first..first + out.len() / cols` of `tensor`, as f32, into `out`.
    pub fn read_rows(
        &self,
        name: &str,
        tensor: &StoredTensor,
        first: usize,
        out: &mut [f32],
    ) -> Result<(), DuetError> {
        let (_, cols) = tensor.rows_cols();
        let width = tensor.value_width().ok_or_else(|| {
            DuetError::ModelLoad(format!(
                "{}: tensor {name} is {:?}; duet reads F32, F16 and BF16 checkpoints",
                self.path_of(tensor).display(),
                tensor.dtype
            ))
        })?;
        let mut raw = vec![0u8; out.len() * width];
        let offset = tensor.start + (first * cols * width) as u64;
        self.files[tensor.file]
            .1
            .read_exact_at(&mut raw, offset)
            .map_err(|e| {
                DuetError::ModelLoad(format!(
                    "{}: reading {name}: {e}",
                    self.path_of(tensor).display()
                ))
            })?;
        let pairs = raw.chunks_exact(width);
        match tensor.dtype {
            Dtype::F32 => pairs
                .zip(out.iter_mut())
                .for_each(|(b, o)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => pairs
                .zip(out.iter_mut())
                .for_each(|(b, o)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => pairs
                .zip(out.iter_mut())
                .for_each(|(b, o)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        }
        Ok(())
    }

    /// The whole of a (small) tensor as f32.
    pub fn read_all(&self, name: &str) -> Result<Vec<f32>, DuetError> {
        let tensor = self
            .get(name)
            .ok_or_else(|| DuetError::ModelLoad(format!("the checkpoint has no tensor {name}")))?;
        let mut out = vec![0.0; tensor.shape.iter().product()];
        self.read_rows(name, tensor, 0, &mut out)?;
        Ok(out)
    }
}
