//! The student's tokenizer: a `tokenizers` tokenizer (built by `load::vocabulary`) plus each
//! token's raw bytes for incremental detokenization, and which tokens are special.

use std::collections::HashMap;

use tokenizers::Tokenizer;

use crate::error::DuetError;

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
    /// Wraps a built tokenizer: every token's raw bytes are laid out once (`byte_level`:
    /// token texts are GPT-2's byte-to-unicode mapping, as in byte-level BPE).
    pub fn new(inner: Tokenizer, byte_level: bool, bos: Option<u32>, eos: Option<u32>) -> Self {
        let vocab = inner.get_vocab_size(true);
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
        Self {
            inner,
            token_bytes,
            token_ends,
            special,
            bos,
            eos,
        }
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

pub fn uses_byte_level(t: &Tokenizer) -> bool {
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
