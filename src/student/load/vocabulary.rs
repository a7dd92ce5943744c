//! The tokenizer for a GGUF model: the `tokenizer.json` the GGUF carries whole
//! (`tokenizer.huggingface.json`, written by duet's checkpoint conversion), else a
//! `tokenizer.json` beside the file, else a byte-level BPE built from the GGUF's own
//! `tokenizer.ggml.*` metadata with the pre-tokenizer llama.cpp uses for its `tokenizer.ggml.pre`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{self, GgufHeader};
use crate::error::DuetError;
use crate::student::text::tokenizer::{StudentTokenizer, uses_byte_level};

/// GPT-2's pre-tokenizer split, used by SmolLM2 after single digits are split off.
pub const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Qwen2's pre-tokenizer split.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama-3's split (the default for llama-architecture GPT-2 style vocabularies).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types that mark a token as special (control or user-defined).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Builds the tokenizer for the model at `model_path`: the tokenizer.json it carries, else
/// one beside it, else the GGUF's vocabulary metadata.
pub fn load_tokenizer(
    model_path: &Path,
    header: &GgufHeader,
) -> Result<StudentTokenizer, DuetError> {
    let md = header.metadata();
    let beside = model_path.with_file_name("tokenizer.json");
    let carried = gguf::string(md, "tokenizer.huggingface.json").ok();
    // The model's own tokenizer.json, carried inside, is the surest; one beside the file
    // may belong to another model sharing the folder.
    let (inner, from_json) = if let Some(json) = carried {
        let t = json.parse::<Tokenizer>().map_err(|e| {
            DuetError::ModelLoad(format!("the GGUF's tokenizer.huggingface.json: {e}"))
        })?;
        (t, true)
    } else if beside.is_file() {
        let t = Tokenizer::from_file(&beside)
            .map_err(|e| DuetError::ModelLoad(format!("cannot read {}: {e}", beside.display())))?;
        (t, true)
    } else {
        (from_gguf_metadata(md)?, false)
    };
    let byte_level = !from_json || uses_byte_level(&inner);
    Ok(StudentTokenizer::new(
        inner,
        byte_level,
        gguf::opt_u32(md, "tokenizer.ggml.bos_token_id"),
        gguf::opt_u32(md, "tokenizer.ggml.eos_token_id"),
    ))
}

/// A byte-level BPE tokenizer from `tokenizer.ggml.{model,pre,tokens,merges,token_type}`.
pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Tokenizer, DuetError> {
    let model = gguf::string(md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(DuetError::ModelLoad(format!(
            "tokenizer model `{model}` cannot be built from GGUF metadata (duet builds byte-level \
             BPE, `gpt2`); put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let tokens = gguf::strings(md, "tokenizer.ggml.tokens")?;
    let merges = gguf::strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| DuetError::ModelLoad(format!("malformed BPE merge `{m}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| DuetError::ModelLoad(format!("BPE vocabulary: {e}")))?;

    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, DuetError> {
        Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(PreTokenizerWrapper::Split)
        .map_err(|e| DuetError::ModelLoad(format!("pre-tokenizer regex: {e}")))
    };
    let mut steps = match pre {
        "smollm" => vec![split(r"\p{N}")?, split(GPT2_SPLIT)?],
        "qwen2" => vec![split(QWEN2_SPLIT)?],
        "llama-bpe" | "llama3" => vec![split(LLAMA3_SPLIT)?],
        "gpt-2" | "default" => vec![split(GPT2_SPLIT)?],
        other => {
            return Err(DuetError::ModelLoad(format!(
                "pre-tokenizer `{other}` is not known to duet (known: smollm, qwen2, llama-bpe, gpt-2); \
                 put the model's tokenizer.json beside the GGUF file"
            )));
        }
    };
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| DuetError::ModelLoad(format!("special tokens: {e}")))?;
    Ok(tokenizer)
}
