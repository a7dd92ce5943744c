//! A PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`), merged into the
//! base weights row by row as they are read: `W + scale * B @ A`, with PEFT's scale
//! (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::shards::Shards;
use crate::error::DuetError;

/// The linear layers of Llama and Qwen2 blocks an adapter may target.
const MERGEABLE: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    // `r` is not read: each matrix's shape gives its rank (PEFT's rank_pattern varies it).
    lora_alpha: f32,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// One adapted weight: `delta = scale * B (out x r) @ A (r x in)`.
struct LoraPair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

/// An adapter, held in memory (its matrices are small: `r` rows or columns each).
pub struct Adapter {
    /// By the base weight's name: `model.layers.3.self_attn.q_proj.weight`.
    pairs: HashMap<String, LoraPair>,
    pub base_model: Option<String>,
}

impl Adapter {
    /// Reads the adapter in `dir`, checking every matrix against the base checkpoint.
    pub fn open(dir: &Path, base: &Shards) -> Result<Self, DuetError> {
        let config_path = dir.join("adapter_config.json");
        let bad_config =
            |why: String| DuetError::ModelLoad(format!("{}: {why}", config_path.display()));
        let config: AdapterConfig = super::read_json(&config_path)?;
        if let Some(kind) = config.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(bad_config(format!(
                "peft_type {kind} is not a LoRA adapter"
            )));
        }
        if config.use_dora {
            return Err(bad_config(
                "use_dora is not supported: duet merges plain LoRA".into(),
            ));
        }
        check_targets(config.target_modules.as_ref()).map_err(bad_config)?;
        if config.fan_in_fan_out {
            // PEFT itself turns it off for torch.nn.Linear, which all these layers are.
            tracing::warn!(
                "{}: fan_in_fan_out ignored: Llama and Qwen2 layers are nn.Linear, as PEFT does",
                config_path.display()
            );
        }

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(DuetError::ModelLoad(format!(
                "{} does not exist (duet reads safetensors adapters, not adapter_model.bin)",
                weights_path.display()
            )));
        }
        let file = Shards::open(std::slice::from_ref(&weights_path))?;
        let bad_weights =
            |why: String| DuetError::ModelLoad(format!("{}: {why}", weights_path.display()));
        let mut pairs = HashMap::new();
        for name in file.names() {
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                if name.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(bad_weights(format!(
                    "tensor {name} is not a LoRA matrix of a linear layer duet can merge into (known: {})",
                    MERGEABLE.join(", ")
                )));
            };
            let short = module.rsplit('.').next().unwrap_or(module);
            if !MERGEABLE.contains(&short) {
                return Err(bad_weights(format!(
                    "tensor {name} adapts `{short}`, which duet cannot merge into (known: {})",
                    MERGEABLE.join(", ")
                )));
            }
            let b_name = format!("{module}.lora_B.weight");
            let a = file.get(name).expect("listed");
            let b = file
                .get(&b_name)
                .ok_or_else(|| bad_weights(format!("{name} has no {b_name}")))?;
            let base_name = format!(
                "{}.weight",
                module.strip_prefix("base_model.model.").unwrap_or(module)
            );
            let weight = base.get(&base_name).ok_or_else(|| {
                bad_weights(format!(
                    "{name} adapts {base_name}, which the base checkpoint lacks"
                ))
            })?;
            let (out, input) = weight.rows_cols();
            let (rank, a_in) = a.rows_cols();
            let (b_out, b_rank) = b.rows_cols();
            if a.shape.len() != 2
                || b.shape.len() != 2
                || a_in != input
                || b_out != out
                || b_rank != rank
            {
                return Err(bad_weights(format!(
                    "{module}: lora_A {:?} and lora_B {:?} do not fit the base weight {:?} \
                     (an adapter for another model?)",
                    a.shape, b.shape, weight.shape
                )));
            }
            let alpha = pattern_value(&config.alpha_pattern, module).unwrap_or(config.lora_alpha);
            let scale = if config.use_rslora {
                alpha / (rank as f32).sqrt()
            } else {
                alpha / rank as f32
            };
            pairs.insert(
                base_name,
                LoraPair {
                    a: file.read_all(name)?,
                    b: file.read_all(&b_name)?,
                    rank,
                    scale,
                },
            );
        }
        if pairs.is_empty() {
            return Err(bad_weights("holds no LoRA matrices".into()));
        }
        Ok(Self {
            pairs,
            base_model: config.base_model_name_or_path,
        })
    }

    /// Adds the adapter's delta to rows `first..` of `weight` held in `rows` (`cols` wide).
    pub fn add_to_rows(&self, weight: &str, first: usize, cols: usize, rows: &mut [f32]) {
        let Some(pair) = self.pairs.get(weight) else {
            return;
        };
        for (i, row) in rows.chunks_exact_mut(cols).enumerate() {
            let b_row = &pair.b[(first + i) * pair.rank..][..pair.rank];
            for (k, &b) in b_row.iter().enumerate() {
                let coefficient = pair.scale * b;
                let a_row = &pair.a[k * cols..][..cols];
                for (w, &a) in row.iter_mut().zip(a_row) {
                    *w += coefficient * a;
                }
            }
        }
    }

    /// Warns when the adapter says it was trained on another base model than `base`.
    pub fn warn_if_other_base(&self, base: &[&str]) {
        let Some(trained_on) = self.base_model.as_deref().filter(|b| !b.is_empty()) else {
            return;
        };
        let last = |s: &str| super::last_component(s).to_ascii_lowercase();
        if !base
            .iter()
            .any(|b| !b.is_empty() && last(b) == last(trained_on))
        {
            tracing::warn!(
                adapter_base = trained_on,
                checkpoint = ?base,
                "the LoRA adapter was made for another base model; merging it anyway since its shapes fit"
            );
        }
    }
}

/// Checks `target_modules`: a list of the mergeable names, or `all-linear`.
fn check_targets(targets: Option<&serde_json::Value>) -> Result<(), String> {
    let names: Vec<&str> = match targets {
        None => return Ok(()),
        Some(serde_json::Value::String(s)) if s == "all-linear" => return Ok(()),
        Some(serde_json::Value::String(s)) => {
            return Err(format!(
                "target_modules `{s}` (a regular expression) is not supported: list the modules, from {}",
                MERGEABLE.join(", ")
            ));
        }
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).collect(),
        Some(other) => {
            return Err(format!(
                "target_modules {other} is neither a list nor a string"
            ));
        }
    };
    let unknown: Vec<&str> = names
        .into_iter()
        .filter(|n| !MERGEABLE.contains(&n.rsplit('.').next().unwrap_or(n)))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "target modules {unknown:?} are not ones duet can merge into (known: {})",
            MERGEABLE.join(", ")
        ))
    }
}

/// PEFT's per-module override (`alpha_pattern`): a key matches a module whose dotted name
/// ends with it (PEFT reads keys as regular expressions; the names it writes are plain), the
/// longest key winning so the answer never depends on the map's order. Ranks need no such
/// table: each matrix's own shape gives its `r`.
fn pattern_value(patterns: &HashMap<String, f32>, module: &str) -> Option<f32> {
    patterns
        .iter()
        .filter(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
        .max_by_key(|(key, _)| key.len())
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_mergeable_linear_layers() {
        let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert!(check_targets(Some(&json(r#"["q_proj", "v_proj"]"#))).is_ok());
        assert!(check_targets(Some(&json(r#""all-linear""#))).is_ok());
        let err = check_targets(Some(&json(r#"["q_proj", "embed_tokens"]"#))).unwrap_err();
        assert!(err.contains("embed_tokens"), "{err}");
        assert!(check_targets(Some(&json(r#"".*proj""#))).is_err());
    }

    /// Writes f32 `tensors` as a safetensors file.
    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn peft_scales_plain_and_rank_stabilized_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("model.safetensors");
        let weight = "model.layers.0.self_attn.q_proj.weight";
        write(&base_path, &[(weight, vec![1, 2], vec![0.0, 0.0])]);
        let base = Shards::open(&[base_path]).unwrap();
        let module = "base_model.model.model.layers.0.self_attn.q_proj";
        // r = 4: A is 4 x 2, B is 1 x 4; B @ A = [4, 0].
        write(
            &dir.path().join("adapter_model.safetensors"),
            &[
                (
                    &format!("{module}.lora_A.weight"),
                    vec![4, 2],
                    vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                ),
                (&format!("{module}.lora_B.weight"), vec![1, 4], vec![1.0; 4]),
            ],
        );
        let delta = |rslora: bool| {
            let config = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                "target_modules": ["q_proj"], "use_rslora": rslora});
            std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
            let adapter = Adapter::open(dir.path(), &base).unwrap();
            let mut row = vec![0.0; 2];
            adapter.add_to_rows(weight, 0, 2, &mut row);
            row
        };
        assert_eq!(delta(false), vec![8.0, 0.0], "lora_alpha / r = 2");
        assert_eq!(delta(true), vec![16.0, 0.0], "lora_alpha / sqrt(r) = 4");
    }

    #[test]
    fn the_delta_is_scale_times_b_times_a() {
        let adapter = Adapter {
            pairs: HashMap::from([(
                "w".to_string(),
                LoraPair {
                    // r = 2, in = 3, out = 2
                    a: vec![1.0, 0.0, 2.0, 0.0, 1.0, 0.0],
                    b: vec![1.0, 1.0, 0.0, 3.0],
                    rank: 2,
                    scale: 0.5,
                },
            )]),
            base_model: None,
        };
        let mut rows = vec![10.0; 3];
        // Row 1 of B is [0, 3]: delta = 0.5 * 3 * A[1] = [0, 1.5, 0].
        adapter.add_to_rows("w", 1, 3, &mut rows);
        assert_eq!(rows, vec![10.0, 11.5, 10.0]);
        let mut rows = vec![0.0; 6];
        adapter.add_to_rows("w", 0, 3, &mut rows);
        assert_eq!(rows, vec![0.5, 0.5, 1.0, 0.0, 1.5, 0.0]);
    }
}
