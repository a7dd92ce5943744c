//! The student's tokenizer, built from the GGUF's own `tokenizer.ggml.*` metadata with the
//! `tokenizers` crate (a `tokenizer.json` beside the model wins when present), plus each
//! token's raw bytes for incremental detokenization.

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

/// GPT-2's pre-tokenizer split, used by SmolLM2 after single digits are split off.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Qwen2's pre-tokenizer split.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama-3's split (the default for llama-architecture GPT-2 style vocabularies).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types that mark a token as special (control or user-defined).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer with everything generation needs beside the vocabulary itself.
pub struct StudentTokenizer {
    inner: Tokenizer,
    /// Raw bytes of every token, back to back, so generated text can be assembled
    /// byte-exactly; token `i` is `token_bytes[token_ends[i - 1]..token_ends[i]]`. One
    /// buffer instead of a vector per token saves megabytes on large vocabularies.
    token_bytes: Vec<u8>,
    token_ends: Vec<u32>,
    /// Text of the special tokens by id (never shown to clients).
    special: HashMap<u32, String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl StudentTokenizer {
    /// Builds the tokenizer for the model at `model_path`: `tokenizer.json` beside it when
    /// present, the GGUF metadata otherwise.
    pub fn load(model_path: &Path, header: &GgufHeader) -> Result<Self, DuetError> {
        let md = header.metadata();
        let beside = model_path.with_file_name("tokenizer.json");
        let inner = if beside.is_file() {
            Tokenizer::from_file(&beside).map_err(|e| {
                DuetError::ModelLoad(format!("cannot read {}: {e}", beside.display()))
            })?
        } else {
            from_gguf(md)?
        };
        let vocab = inner.get_vocab_size(true);
        let byte_level = !beside.is_file() || uses_byte_level(&inner);
        let mut token_bytes = Vec::new();
        let mut token_ends = Vec::with_capacity(vocab);
        for id in 0..vocab as u32 {
            let text = inner.id_to_token(id).unwrap_or_default();
            token_bytes.extend_from_slice(&token_to_bytes(&text, byte_level));
            token_ends.push(token_bytes.len() as u32);
        }
        token_bytes.shrink_to_fit();
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        Ok(Self {
            inner,
            token_bytes,
            token_ends,
            special,
            bos: gguf::opt_u32(md, "tokenizer.ggml.bos_token_id"),
            eos: gguf::opt_u32(md, "tokenizer.ggml.eos_token_id"),
        })
    }

    /// Token ids of `text`; special tokens written in the text are matched whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DuetError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DuetError::Internal(format!("tokenizer: {e}")))
    }

    /// The raw bytes a token stands for (special tokens: their literal text).
    pub fn bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        let Some(&end) = self.token_ends.get(i) else {
            return &[];
        };
        let start = if i == 0 { 0 } else { self.token_ends[i - 1] };
        &self.token_bytes[start as usize..end as usize]
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains_key(&id)
    }

    /// The id of a special token written as text, e.g. `<|im_end|>`.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.special
            .iter()
            .find(|(_, t)| t.as_str() == text)
            .map(|(id, _)| *id)
    }

    /// Text of a token by id (special tokens included), for templates and logs.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.special
            .get(&id)
            .cloned()
            .or_else(|| String::from_utf8(self.bytes(id).to_vec()).ok())
    }
}

/// A byte-level BPE tokenizer from `tokenizer.ggml.{model,pre,tokens,merges,token_type}`.
fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, DuetError> {
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

fn uses_byte_level(t: &Tokenizer) -> bool {
    t.id_to_token(0).is_some()
        && serde_json::to_value(t.get_decoder())
            .map(|d| d.to_string().contains("ByteLevel"))
            .unwrap_or(false)
}

/// The bytes behind one vocabulary entry: GPT-2 byte-level tokens map each character back
/// to one byte; `<0xNN>` is a byte-fallback token; `▁` is SentencePiece's space.
fn token_to_bytes(token: &str, byte_level: bool) -> Vec<u8> {
    if token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && let Ok(b) = u8::from_str_radix(&token[3..5], 16)
    {
        return vec![b];
    }
    if byte_level {
        let table = unicode_to_byte();
        let bytes: Option<Vec<u8>> = token.chars().map(|c| table.get(&c).copied()).collect();
        if let Some(bytes) = bytes {
            return bytes;
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's reversible byte <-> printable-character table, inverted.
fn unicode_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    b as u32
                } else {
                    next += 1;
                    next - 1
                };
                (char::from_u32(c).expect("valid code point"), b)
            })
            .collect()
    })
}
