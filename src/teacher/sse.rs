//! Splitting the teacher's Server-Sent Events stream into whole events, so duet relays
//! each event as it completes and can end a broken stream cleanly (an error event after a
//! half-sent one would otherwise be glued onto it). Malformed input is reported, never
//! passed on, and no event may grow without bound.

use actix_web::web::{Bytes, BytesMut};

/// Largest single event accepted from the teacher; beyond it the stream is malformed.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One complete event, ready to forward as is (including its blank-line terminator).
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub raw: Bytes,
    /// `data: [DONE]`: the stream's proper end.
    pub is_done: bool,
}

/// Why the teacher's stream could not be relayed further.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SseError {
    #[error("the teacher sent malformed SSE: {0}")]
    Malformed(String),
    #[error("the teacher sent an event larger than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

/// Accumulates bytes and yields whole events.
#[derive(Default)]
pub struct SseSplitter {
    buf: BytesMut,
}

impl SseSplitter {
    /// Adds bytes from the wire; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw = self.buf.split_to(end).freeze();
            if let Some(event) = check(raw)? {
                events.push(event);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(events)
    }

    /// Whether bytes of an unfinished event are waiting (the stream was cut inside one).
    pub fn has_partial_event(&self) -> bool {
        self.buf.iter().any(|b| !b.is_ascii_whitespace())
    }
}

/// Index just past the first blank line (`\n\n` or `\r\n\r\n`).
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Validates one event; comment-only events (keep-alives) are kept, empty ones dropped.
fn check(raw: Bytes) -> Result<Option<SseEvent>, SseError> {
    let text = std::str::from_utf8(&raw)
        .map_err(|_| SseError::Malformed("an event is not UTF-8".into()))?;
    let mut data = String::new();
    let mut any_line = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        any_line = true;
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        match field {
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
            "event" | "id" | "retry" => {}
            _ => {
                return Err(SseError::Malformed(format!(
                    "unexpected line `{}`",
                    truncate(line)
                )));
            }
        }
    }
    if !any_line {
        return Ok(None);
    }
    let is_done = data.trim() == "[DONE]";
    if !data.is_empty() && !is_done && serde_json::from_str::<serde::de::IgnoredAny>(&data).is_err()
    {
        return Err(SseError::Malformed(format!(
            "data is not JSON: `{}`",
            truncate(&data)
        )));
    }
    Ok(Some(SseEvent { raw, is_done }))
}

fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(80).map(|(i, _)| i).unwrap_or(s.len());
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_come_out_whole() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: {\"a\"").unwrap().is_empty());
        assert!(s.has_partial_event());
        let events = s.push(b": 1}\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(&events[0].raw[..], b"data: {\"a\": 1}\n\n");
        assert!(events[1].is_done);
        assert!(!s.has_partial_event());
    }

    #[test]
    fn crlf_and_comments_are_accepted() {
        let mut s = SseSplitter::default();
        let events = s
            .push(b": keep-alive\r\n\r\nevent: x\r\ndata: {}\r\n\r\n")
            .unwrap();
        assert_eq!(events.len(), 2);
        assert!(!events[1].is_done);
    }

    #[test]
    fn malformed_streams_are_reported() {
        assert!(matches!(
            SseSplitter::default().push(b"hello\n\n"),
            Err(SseError::Malformed(_))
        ));
        assert!(matches!(
            SseSplitter::default().push(b"data: {not json\n\n"),
            Err(SseError::Malformed(_))
        ));
        assert!(matches!(
            SseSplitter::default().push(b"data: \xff\n\n"),
            Err(SseError::Malformed(_))
        ));
        let huge = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert_eq!(SseSplitter::default().push(&huge), Err(SseError::TooLarge));
    }
}
