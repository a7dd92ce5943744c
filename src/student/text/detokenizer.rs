//! Incremental detokenization: token bytes in, complete UTF-8 text out. A character whose
//! bytes span several tokens (Chinese, emoji) is held back until its last byte arrives, so
//! no delta ever carries a broken sequence. Bytes of a character that generation stopped
//! in the middle of (a length cut inside an emoji) are not text and are never sent.

/// Accumulates token bytes and releases the longest valid UTF-8 prefix.
#[derive(Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// Adds one token's bytes; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(), // an incomplete tail: wait
            Err(e) => {
                // Bytes that can never become valid: replace them, as a decoder would.
                let bad_end = e.valid_up_to() + e.error_len().unwrap_or(1);
                let mut text = String::from_utf8_lossy(&self.pending[..bad_end]).into_owned();
                self.pending.drain(..bad_end);
                text.push_str(&self.push(&[]));
                return text;
            }
        };
        String::from_utf8(self.pending.drain(..valid).collect()).expect("checked above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens_come_out_whole() {
        let text = "用中文写😀 ok";
        let mut d = Detokenizer::default();
        let mut out = Vec::new();
        for b in text.as_bytes() {
            let piece = d.push(&[*b]);
            if !piece.is_empty() {
                out.push(piece);
            }
        }
        assert_eq!(out.concat(), text);
        assert_eq!(out[0], "用");
        assert!(out.contains(&"😀".to_string()));
        assert!(d.pending.is_empty());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = Detokenizer::default();
        assert_eq!(d.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
        assert_eq!(
            d.push(&[0xE4, 0xB8]),
            "",
            "half a character waits for the rest"
        );
    }
}
