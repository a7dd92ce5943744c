//! Tool calls out of the student's text. The model writes each call as
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, or one call bare as the
//! whole answer (its grammar sees to both); text around the calls is the message's content.
//! Streamed text is passed on as it comes, less any tail that may be the start of
//! `<tool_call>`; a call opens once its name is known and its arguments follow in pieces as
//! they are written, as OpenAI streams them.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What the text holds, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// A whole call: the function's name and its arguments as a JSON string (OpenAI's form).
    Call {
        name: String,
        arguments: String,
    },
    /// A call whose arguments follow in [`Arguments`](Piece::Arguments) pieces.
    Opened {
        name: String,
    },
    /// The next piece of the open call's arguments.
    Arguments(String),
}

/// Where the open call's arguments stand: nesting, inside a string, after a backslash.
#[derive(Debug, Default)]
struct Scan {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl Scan {
    /// How many bytes of `text` belong to the arguments value (all of it if it goes on),
    /// and whether the value ended there.
    fn take(&mut self, text: &str) -> (usize, bool) {
        for (i, c) in text.char_indices() {
            let end = i + c.len_utf8();
            if self.in_string {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, '\\') => self.escaped = true,
                    (false, '"') => {
                        self.in_string = false;
                        if self.depth == 0 {
                            return (end, true);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => self.in_string = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return (end, true);
                    }
                }
                _ => {}
            }
        }
        (text.len(), false)
    }
}

/// Splits a stream of text into content and calls.
#[derive(Debug, Default)]
pub struct ToolCallText {
    pending: String,
    in_call: bool,
    /// The open call's arguments are being passed on (its name went out).
    arguments: Option<Scan>,
    /// The open call's arguments are complete: the rest up to `</tool_call>` is dropped.
    arguments_done: bool,
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
            if self.in_call
                && self.arguments.is_none()
                && !self.arguments_done
                && let Some((name, start)) = call_head(&self.pending)
            {
                self.pending.drain(..start);
                self.calls += 1;
                self.arguments = Some(Scan::default());
                out.push(Piece::Opened { name });
                continue;
            }
            if let Some(scan) = &mut self.arguments {
                let (taken, ended) = scan.take(&self.pending);
                let piece: String = self.pending.drain(..taken).collect();
                if !piece.is_empty() {
                    out.push(Piece::Arguments(piece));
                }
                if !ended {
                    break;
                }
                self.arguments = None;
                self.arguments_done = true;
                continue;
            }
            if self.in_call && self.arguments_done {
                let Some(end) = self.pending.find(CLOSE) else {
                    break;
                };
                self.pending.drain(..end + CLOSE.len());
                self.in_call = false;
                self.arguments_done = false;
            } else if self.in_call {
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

    /// Whatever is left when the text ends: a call cut short before its arguments began
    /// stays text (one whose arguments were going out stays cut).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        if self.arguments.take().is_some() || std::mem::take(&mut self.arguments_done) {
            self.in_call = false;
            return Vec::new();
        }
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

/// The name of a call whose text so far is `{"name": "...", "arguments": ` (any blank
/// space), and where its arguments begin; `None` until that much has come.
fn call_head(text: &str) -> Option<(String, usize)> {
    let key = text.find("\"arguments\"")?;
    let after = &text[key + "\"arguments\"".len()..];
    let colon = after.find(':')?;
    if !after[..colon].trim().is_empty() {
        return None;
    }
    let value = after[colon + 1..].find(|c: char| !c.is_whitespace())?;
    let head = format!("{}}}", text[..key].trim().trim_end_matches(','));
    let name = serde_json::from_str::<Value>(&head).ok()?["name"]
        .as_str()?
        .to_string();
    Some((name, key + "\"arguments\"".len() + colon + 1 + value))
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
            Piece::Opened { name } => calls.push((name, String::new())),
            Piece::Arguments(more) => {
                if let Some((_, arguments)) = calls.last_mut() {
                    arguments.push_str(&more);
                }
            }
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
                arguments: r#"{"city": "Paris"}"#.into(),
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
            // Content may arrive in several pieces, arguments too: join them.
            let mut joined: Vec<Piece> = Vec::new();
            for p in pieces {
                match (joined.last_mut(), p) {
                    (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                    (Some(Piece::Call { arguments, .. }), Piece::Arguments(b)) => {
                        arguments.push_str(&b)
                    }
                    (_, Piece::Opened { name }) => joined.push(Piece::Call {
                        name,
                        arguments: String::new(),
                    }),
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
