//! Tool calls out of the student's text. The model writes each call as
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, or one call bare as the
//! whole answer (its grammar sees to both); text around the calls is the message's content. Streamed text is passed on as it comes,
//! less any tail that may be the start of `<tool_call>`; each call goes out whole once its
//! closing tag has arrived.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What the text holds, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// A call: the function's name and its arguments as a JSON string (OpenAI's form).
    Call {
        name: String,
        arguments: String,
    },
}

/// Splits a stream of text into content and calls.
#[derive(Debug, Default)]
pub struct ToolCallText {
    pending: String,
    in_call: bool,
    /// Whether content has gone out (an answer opening with `{` is held: a bare call).
    spoke: bool,
    /// Calls found so far.
    pub calls: usize,
}

impl ToolCallText {
    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(CLOSE) else {
                    break;
                };
                let body = self.pending[..end].trim().to_string();
                self.pending.drain(..end + CLOSE.len());
                self.in_call = false;
                match parse_call(&body) {
                    Some(call) => {
                        self.calls += 1;
                        out.push(call);
                    }
                    None => out.push(Piece::Content(format!("{OPEN}{body}{CLOSE}"))),
                }
            } else if !self.spoke && self.calls == 0 && self.pending.trim_start().starts_with('{') {
                // A bare call: complete only at the end of the answer.
                break;
            } else if let Some(start) = self.pending.find(OPEN) {
                let before: String = self.pending.drain(..start).collect();
                self.content(before, &mut out);
                self.pending.drain(..OPEN.len());
                self.in_call = true;
            } else {
                // Keep back what may be the start of an opening tag.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&n| self.pending.ends_with(&OPEN[..n]))
                    .unwrap_or(0);
                let text: String = self.pending.drain(..self.pending.len() - keep).collect();
                self.content(text, &mut out);
                break;
            }
        }
        out
    }

    /// Whatever is left when the text ends: a call cut short stays text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        if !self.spoke
            && self.calls == 0
            && !self.in_call
            && let Some(call) = parse_call(rest.trim())
        {
            self.calls += 1;
            return vec![call];
        }
        let rest = if std::mem::take(&mut self.in_call) {
            format!("{OPEN}{rest}")
        } else {
            rest
        };
        let mut out = Vec::new();
        self.content(rest, &mut out);
        out
    }

    /// Content, less the blank lines between and after calls.
    fn content(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() || (self.calls > 0 && text.trim().is_empty()) {
            return;
        }
        self.spoke = true;
        out.push(Piece::Content(text));
    }
}

/// `{"name": ..., "arguments": {...}}` as a call.
fn parse_call(body: &str) -> Option<Piece> {
    let call: Value = serde_json::from_str(body).ok()?;
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = match call.get("arguments") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".to_string(),
    };
    Some(Piece::Call { name, arguments })
}

/// A whole answer's content (`None` when it is only calls) and calls.
pub fn split(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut parser = ToolCallText::default();
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Content(c) => content.push_str(&c),
            Piece::Call { name, arguments } => calls.push((name, arguments)),
        }
    }
    let content = content.trim();
    let content = (!content.is_empty() || calls.is_empty()).then(|| content.to_string());
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_split_from_text_in_any_chunking() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let expected = vec![
            Piece::Content("Let me check.\n".into()),
            Piece::Call {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            Piece::Call {
                name: "get_time".into(),
                arguments: "{}".into(),
            },
        ];
        for size in [1, 2, 3, 7, 1000] {
            let mut parser = ToolCallText::default();
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(size) {
                pieces.extend(parser.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(parser.finish());
            // Content may arrive in several pieces: join adjacent ones.
            let mut joined: Vec<Piece> = Vec::new();
            for p in pieces {
                match (joined.last_mut(), p) {
                    (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                    (_, p) => joined.push(p),
                }
            }
            assert_eq!(joined, expected, "chunks of {size}");
            assert_eq!(parser.calls, 2);
        }
        let (content, calls) = split(text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn a_bare_call_is_a_call_and_other_json_stays_text() {
        let (content, calls) = split("{\"name\": \"f\", \"arguments\": {\"a\": 1}}");
        assert_eq!(
            (content, calls),
            (None, vec![("f".into(), r#"{"a":1}"#.into())])
        );
        let (content, calls) = split("{\"answer\": 42}");
        assert_eq!(
            (content.as_deref(), calls.len()),
            (Some("{\"answer\": 42}"), 0)
        );
    }

    #[test]
    fn plain_text_and_cut_calls_stay_text() {
        assert_eq!(
            split("Just text < here"),
            (Some("Just text < here".into()), vec![])
        );
        let (content, calls) = split("<tool_call>\n{\"name\": \"f\", \"argu");
        assert!(calls.is_empty());
        assert_eq!(
            content.as_deref(),
            Some("<tool_call>\n{\"name\": \"f\", \"argu")
        );
        let (content, calls) =
            split("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>");
        assert_eq!((content, calls.len()), (None, 1));
    }
}
