//! Server-Sent Events framing for streamed completions: `data: {json}\n\n` per event,
//! `data: [DONE]\n\n` last, and comment lines to keep idle connections open.

use actix_web::web::Bytes;
use serde::Serialize;

/// The stream's last event.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// A comment line: ignored by clients, keeps proxies from closing a quiet stream.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// One `data:` event carrying `value` as compact JSON.
pub fn event(value: &impl Serialize) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value).expect("wire types always serialize");
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_data_lines_with_a_blank_line_after() {
        let e = event(&serde_json::json!({"text": "two\nlines"}));
        assert_eq!(&e[..], b"data: {\"text\":\"two\\nlines\"}\n\n");
        assert!(
            !e[..e.len() - 2].contains(&b'\n'),
            "a newline inside the JSON would split the event"
        );
        assert_eq!(DONE, b"data: [DONE]\n\n");
        assert!(KEEP_ALIVE.starts_with(b":"));
    }
}
