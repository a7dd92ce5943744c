//! The GGUF metadata for a converted checkpoint, under the keys llama.cpp's converter uses:
//! hyper-parameters from `config.json`; the tokenizer both as `tokenizer.ggml.*` arrays (what
//! llama.cpp reads) and whole as `tokenizer.huggingface.json` (what duet reads, so its ids are
//! exactly transformers'); the chat template, special tokens and generation defaults from
//! `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`.

use std::path::Path;

use serde_json::Value as Json;

use super::gguf_writer::MetaValue;
use super::model_config::ModelConfig;
use crate::config::Quantization;
use crate::error::DuetError;
use crate::student::model::Architecture;

/// GGUF token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Everything but the tensors, for the checkpoint in `dir` whose embedding table has
/// `vocab_rows` rows.
pub fn build(
    dir: &Path,
    config: &ModelConfig,
    vocab_rows: usize,
    quantization: Quantization,
    name: &str,
) -> Result<Vec<(String, MetaValue)>, DuetError> {
    let arch = config.arch().key();
    let mut md: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |key: &str, value: MetaValue| md.push((key.to_string(), value));
    put("general.architecture", MetaValue::Str(arch.into()));
    put("general.name", MetaValue::Str(name.into()));
    // llama.cpp's llama_ftype numbers: MOSTLY_Q4_K_M = 15, MOSTLY_Q8_0 = 7.
    let file_type = match quantization {
        Quantization::Q4KM => 15,
        Quantization::Q8_0 => 7,
    };
    put("general.file_type", MetaValue::U32(file_type));
    put("general.quantization_version", MetaValue::U32(2));
    let u = |v: usize| MetaValue::U32(v as u32);
    put(
        &format!("{arch}.context_length"),
        u(config.max_position_embeddings),
    );
    put(&format!("{arch}.embedding_length"), u(config.hidden_size));
    put(&format!("{arch}.block_count"), u(config.num_hidden_layers));
    put(
        &format!("{arch}.feed_forward_length"),
        u(config.intermediate_size),
    );
    put(
        &format!("{arch}.attention.head_count"),
        u(config.num_attention_heads),
    );
    put(
        &format!("{arch}.attention.head_count_kv"),
        u(config.kv_heads()),
    );
    put(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(config.rms_norm_eps as f32),
    );
    put(
        &format!("{arch}.rope.freq_base"),
        MetaValue::F32(config.rope_theta() as f32),
    );
    put(
        &format!("{arch}.rope.dimension_count"),
        u(config.head_dim()),
    );
    if config.head_dim() * config.num_attention_heads != config.hidden_size {
        put(
            &format!("{arch}.attention.key_length"),
            u(config.head_dim()),
        );
        put(
            &format!("{arch}.attention.value_length"),
            u(config.head_dim()),
        );
    }
    if config.arch() == Architecture::Llama {
        put(&format!("{arch}.vocab_size"), u(vocab_rows));
    }
    let generation = optional_json(&dir.join("generation_config.json"))?;
    tokenizer(dir, vocab_rows, &generation, &mut put)?;
    sampling(&generation, &mut put);
    Ok(md)
}

/// An optional JSON file of the checkpoint (`null` when absent).
fn optional_json(path: &Path) -> Result<Json, DuetError> {
    if path.is_file() {
        super::read_json(path)
    } else {
        Ok(Json::Null)
    }
}

/// A special token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn token_content(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

fn tokenizer(
    dir: &Path,
    vocab_rows: usize,
    generation: &Json,
    put: &mut impl FnMut(&str, MetaValue),
) -> Result<(), DuetError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        DuetError::ModelLoad(format!(
            "cannot read {} (duet needs the fast tokenizer's tokenizer.json): {e}",
            path.display()
        ))
    })?;
    // Validates the file the way duet will use it, so a broken one stops the conversion.
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| DuetError::ModelLoad(format!("{}: {e}", path.display())))?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| DuetError::ModelLoad(format!("{}: {e}", path.display())))?;
    let tokenizer_config = optional_json(&dir.join("tokenizer_config.json"))?;

    // Every token by id: the model's vocabulary, then the added tokens.
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_rows];
    let mut set = |id: u64, text: &str, kind: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some((text.to_string(), kind));
        }
    };
    if let Some(vocab) = json.pointer("/model/vocab").and_then(Json::as_object) {
        for (text, id) in vocab {
            set(id.as_u64().unwrap_or(u64::MAX), text, NORMAL);
        }
    }
    for added in json
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(text)) = (
            added.get("id").and_then(Json::as_u64),
            added.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        let special = added
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        set(id, text, if special { CONTROL } else { USER_DEFINED });
    }
    let id_of = |text: &str| {
        tokens
            .iter()
            .position(|t| t.as_ref().is_some_and(|(s, _)| s == text))
    };

    let byte_level = json
        .get("decoder")
        .is_some_and(|d| d.to_string().contains("\"ByteLevel\""));
    let bpe = json.pointer("/model/type").and_then(Json::as_str) == Some("BPE");
    if byte_level && bpe {
        let merges: Vec<String> = json
            .pointer("/model/merges")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(pair) => Some(format!(
                    "{} {}",
                    pair.first()?.as_str()?,
                    pair.get(1)?.as_str()?
                )),
                _ => None,
            })
            .collect();
        put("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
        put(
            "tokenizer.ggml.pre",
            MetaValue::Str(pre_tokenizer_name(&json).into()),
        );
        let (texts, kinds): (Vec<String>, Vec<i32>) = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| t.clone().unwrap_or((format!("[PAD{id}]"), UNUSED)))
            .unzip();
        put("tokenizer.ggml.tokens", MetaValue::Strings(texts));
        put("tokenizer.ggml.token_type", MetaValue::I32s(kinds));
        put("tokenizer.ggml.merges", MetaValue::Strings(merges));
    } else {
        tracing::warn!(
            "{}: not a byte-level BPE tokenizer; the GGUF carries it for duet only, llama.cpp cannot tokenize with it",
            path.display()
        );
    }
    put("tokenizer.huggingface.json", MetaValue::Str(text));

    let special = |key: &str| token_content(tokenizer_config.get(key)).and_then(id_of);
    let config_id = |key: &str| {
        match generation.get(key)? {
            Json::Array(ids) => ids.first()?.as_u64(),
            other => other.as_u64(),
        }
        .map(|id| id as usize)
    };
    let eos = special("eos_token").or_else(|| config_id("eos_token_id"));
    if let Some(bos) = special("bos_token").or_else(|| config_id("bos_token_id")) {
        put("tokenizer.ggml.bos_token_id", MetaValue::U32(bos as u32));
    }
    if let Some(eos) = eos {
        put("tokenizer.ggml.eos_token_id", MetaValue::U32(eos as u32));
    }
    if let Some(pad) = special("pad_token") {
        put(
            "tokenizer.ggml.padding_token_id",
            MetaValue::U32(pad as u32),
        );
    }
    // generation_config.json may end generation on several tokens (Qwen: <|im_end|> and
    // <|endoftext|>); GGUF has one more slot beside the EOS, `eot_token_id`, which loading
    // also ends on.
    let ends: Vec<usize> = match generation.get("eos_token_id") {
        Some(Json::Array(ids)) => ids
            .iter()
            .filter_map(|i| i.as_u64())
            .map(|i| i as usize)
            .collect(),
        Some(id) => id.as_u64().map(|i| i as usize).into_iter().collect(),
        None => vec![],
    };
    let others: Vec<usize> = ends.into_iter().filter(|id| Some(*id) != eos).collect();
    if let Some(&other) = others.first() {
        put("tokenizer.ggml.eot_token_id", MetaValue::U32(other as u32));
    }
    if others.len() > 1 {
        tracing::warn!(
            ignored = ?&others[1..],
            "generation_config.json ends generation on more tokens than a GGUF can name"
        );
    }
    let add_bos = tokenizer_config
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    put("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos));
    if let Some(template) = chat_template(dir, &tokenizer_config)? {
        put("tokenizer.chat_template", MetaValue::Str(template));
    }
    Ok(())
}

/// The chat template: `chat_template.jinja`, else tokenizer_config.json's `chat_template`
/// (a string, or named templates of which `default` is the one).
fn chat_template(dir: &Path, tokenizer_config: &Json) -> Result<Option<String>, DuetError> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| DuetError::ModelLoad(format!("cannot read {}: {e}", file.display())));
    }
    Ok(match tokenizer_config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or(named.first())
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// llama.cpp's name for the pre-tokenizer whose split pattern tokenizer.json holds.
fn pre_tokenizer_name(json: &Json) -> &'static str {
    use crate::student::load::vocabulary::{GPT2_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT};
    let mut patterns = Vec::new();
    collect_patterns(
        json.get("pre_tokenizer").unwrap_or(&Json::Null),
        &mut patterns,
    );
    match patterns.as_slice() {
        [p] if p == QWEN2_SPLIT => "qwen2",
        [p] if p == LLAMA3_SPLIT => "llama-bpe",
        [d, p] if d == r"\p{N}" && p == GPT2_SPLIT => "smollm",
        [p] if p == GPT2_SPLIT => "gpt-2",
        _ => {
            tracing::warn!(
                ?patterns,
                "tokenizer.json's pre-tokenizer is not one llama.cpp names; writing `default` (duet itself uses tokenizer.json)"
            );
            "default"
        }
    }
}

/// The split patterns of a pre-tokenizer, in order: `Split` steps' own, `\p{N}` for
/// `Digits` with `individual_digits`, GPT-2's for `ByteLevel` with `use_regex`.
fn collect_patterns(node: &Json, out: &mut Vec<String>) {
    use crate::student::load::vocabulary::GPT2_SPLIT;
    match node {
        Json::Object(o) => {
            let flag = |key| o.get(key).and_then(Json::as_bool) == Some(true);
            match o.get("type").and_then(Json::as_str) {
                Some("Split") => out.extend(
                    o.get("pattern")
                        .and_then(|p| p.get("Regex"))
                        .and_then(Json::as_str)
                        .map(str::to_string),
                ),
                Some("Digits") if flag("individual_digits") => out.push(r"\p{N}".into()),
                Some("ByteLevel") if flag("use_regex") => out.push(GPT2_SPLIT.into()),
                _ => {}
            }
            o.values().for_each(|v| collect_patterns(v, out));
        }
        Json::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}

/// `general.sampling.*` from generation_config.json, when it asks for sampling at all
/// (`do_sample`), with transformers' defaults for what it leaves out; a configuration that
/// does not sample leaves the server's defaults.
fn sampling(generation: &Json, put: &mut impl FnMut(&str, MetaValue)) {
    if generation.get("do_sample").and_then(Json::as_bool) != Some(true) {
        return;
    }
    let float = |key, default: f64| {
        let value = generation
            .get(key)
            .and_then(Json::as_f64)
            .unwrap_or(default);
        MetaValue::F32(value as f32)
    };
    put("general.sampling.temp", float("temperature", 1.0));
    put("general.sampling.top_p", float("top_p", 1.0));
    let top_k = generation.get("top_k").and_then(Json::as_u64).unwrap_or(50);
    put("general.sampling.top_k", MetaValue::U32(top_k as u32));
    if generation.get("min_p").is_some_and(|v| !v.is_null()) {
        put("general.sampling.min_p", float("min_p", 0.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collected(generation: &str) -> Vec<(String, MetaValue)> {
        let mut md = Vec::new();
        let json = serde_json::from_str(generation).unwrap();
        sampling(&json, &mut |k: &str, v| md.push((k.to_string(), v)));
        md
    }

    #[test]
    fn sampling_defaults_come_from_generation_config_when_it_samples() {
        // Qwen1.5-Chat's: sampling, no temperature (transformers' 1.0).
        let qwen =
            r#"{"do_sample": true, "eos_token_id": [151645, 151643], "top_p": 0.8, "top_k": 20}"#;
        assert_eq!(
            collected(qwen),
            vec![
                ("general.sampling.temp".to_string(), MetaValue::F32(1.0)),
                ("general.sampling.top_p".to_string(), MetaValue::F32(0.8)),
                ("general.sampling.top_k".to_string(), MetaValue::U32(20)),
            ]
        );
        assert!(
            collected(r#"{"eos_token_id": 2, "temperature": 0.7}"#).is_empty(),
            "a configuration that does not sample leaves the server's defaults"
        );
    }

    #[test]
    fn llama_cpp_pre_tokenizers_are_named_from_tokenizer_json() {
        let name = |pre: &str| {
            pre_tokenizer_name(
                &serde_json::json!({ "pre_tokenizer": serde_json::from_str::<Json>(pre).unwrap() }),
            )
        };
        // SmolLM2's own tokenizer.json.
        let smollm = r#"{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}"#;
        assert_eq!(name(smollm), "smollm");
        assert_eq!(name(r#"{"type": "ByteLevel", "use_regex": true}"#), "gpt-2");
        let qwen = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": crate::student::load::vocabulary::QWEN2_SPLIT}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(name(&qwen.to_string()), "qwen2");
        assert_eq!(name(r#"{"type": "Whitespace"}"#), "default");
    }

    #[test]
    fn the_chat_template_file_wins_and_named_templates_give_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(
            chat_template(dir.path(), &config).unwrap().as_deref(),
            Some("D")
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(
            chat_template(dir.path(), &config).unwrap().as_deref(),
            Some("J")
        );
    }
}
