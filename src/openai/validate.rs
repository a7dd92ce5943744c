//! Turning a wire request into a [`GenerationRequest`]: every field checked, every
//! refusal a 400 that names the field and says why.

use serde_json::Value;

use super::fields;
use super::types::{ChatCompletionRequest, MessageContent};
use crate::backend::{ChatMessage, GenerationRequest, Prompt};
use crate::config::LimitsConfig;
use crate::error::DuetError;

/// Stop sequences a chat request may give: OpenAI's limit.
const MOST_STOP_SEQUENCES: usize = 4;

/// A validated request plus what the HTTP edge itself needs.
#[derive(Debug)]
pub struct ValidChatRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub generation: GenerationRequest,
}

/// Fields a local model cannot honour; the client is told instead of being ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "functions",
        "`functions` is OpenAI's retired form of tool calling; send `tools`",
    ),
    ("audio", "audio output is not supported by the local model"),
];

pub fn validate(
    req: ChatCompletionRequest,
    limits: &LimitsConfig,
) -> Result<ValidChatRequest, DuetError> {
    if req.messages.len() > limits.max_messages {
        return Err(DuetError::invalid(
            "messages",
            format!(
                "{} messages are more than the limit of {} (limits.max_messages)",
                req.messages.len(),
                limits.max_messages
            ),
        ));
    }
    if req.messages.is_empty() {
        return Err(DuetError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    fields::refuse_unsupported(&req.extra, UNSUPPORTED)?;
    let grammar = match req.extra.get("response_format") {
        Some(format) => super::format::response_format(format)?,
        None => None,
    };
    let tools = super::tools::tool_use(&req.extra)?;
    if grammar.is_some() && tools.is_some() {
        return Err(DuetError::unsupported(
            "response_format",
            "the local model holds an answer to a response format or to tool calls, not both",
        ));
    }
    if let Some(n) = req.n
        && n != 1
    {
        return Err(DuetError::unsupported(
            "n",
            format!("n must be 1 (got {n}): duet generates one choice per request"),
        ));
    }

    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                "function" => {
                    return Err(DuetError::unsupported(&param, "role `function` is OpenAI's retired form of tool results; send role `tool`"));
                }
                other => {
                    return Err(DuetError::invalid(&param, format!("unknown role `{other}`; expected system, developer, user, assistant or tool")));
                }
            };
            let tool_calls = match m.extra.get("tool_calls") {
                Some(calls) if role == "assistant" && !calls.is_null() => {
                    super::tools::message_tool_calls(&param, calls)?
                }
                _ => Vec::new(),
            };
            let tool_call_id = match (role, m.extra.get("tool_call_id")) {
                ("tool", Some(Value::String(id))) => Some(id.clone()),
                ("tool", _) => {
                    return Err(DuetError::invalid(&format!("{param}.tool_call_id"), "a `tool` message names the call it answers in `tool_call_id`"));
                }
                _ => None,
            };
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(DuetError::unsupported(&param, format!("content part `{kind}` is not supported; the local model reads text only")));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role: role.to_string(), content, tool_calls, tool_call_id })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(match top {
            None => 0,
            Some(n @ 0..=20) => n as usize,
            Some(n) => {
                return Err(DuetError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20 (got {n})"),
                ));
            }
        }),
        (_, Some(n)) if n > 0 => {
            return Err(DuetError::invalid(
                "top_logprobs",
                "top_logprobs needs `logprobs: true`",
            ));
        }
        _ => None,
    };
    let sampling = fields::sampling(&req.sampling)?;
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => fields::max_tokens("max_completion_tokens", Some(n), 1, limits)?,
        (None, n) => fields::max_tokens("max_tokens", n, 1, limits)?,
    };
    let stop = fields::stop(req.stop, MOST_STOP_SEQUENCES)?;
    let keep_alive = fields::keep_alive(&req.extra)?;

    Ok(ValidChatRequest {
        model: req.model,
        stream: req.stream,
        include_usage: req.stream && req.stream_options.is_some_and(|o| o.include_usage),
        generation: GenerationRequest {
            sampling,
            max_tokens,
            stop,
            keep_alive,
            logprobs,
            grammar,
            tools,
            ..GenerationRequest::new(Prompt::Chat(messages))
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ValidChatRequest, DuetError> {
        validate(
            serde_json::from_value(json).expect("wire shape"),
            &LimitsConfig::default(),
        )
    }

    #[test]
    fn a_plain_request_gets_openai_defaults() {
        let r = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(r.generation.sampling.temperature, None, "left to the model");
        assert_eq!(r.generation.max_tokens, None);
        assert!(!r.stream && !r.include_usage);
    }

    #[test]
    fn content_parts_are_joined_and_developer_is_system() {
        let r = parse(serde_json::json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]}))
        .unwrap();
        let Prompt::Chat(messages) = &r.generation.prompt else {
            panic!("a chat prompt");
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].content, "ab");
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        let cases = [
            (
                serde_json::json!({"model": "m", "messages": []}),
                "messages",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
                "messages[0]",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
                "tools[0].type",
            ),
        ];
        for (json, param) in cases {
            match parse(json) {
                Err(DuetError::InvalidRequest { param: Some(p), .. })
                | Err(DuetError::Unsupported { param: p, .. }) => assert_eq!(p, param),
                other => panic!("expected a 400 about {param}, got {other:?}"),
            }
        }
    }

    #[test]
    fn max_completion_tokens_wins_and_stop_accepts_a_string() {
        let r = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 9, "max_completion_tokens": 3, "stop": "\n", "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(r.generation.max_tokens, Some(3));
        assert_eq!(r.generation.stop, vec!["\n".to_string()]);
        assert!(r.include_usage);
    }

    #[test]
    fn input_limits_cap_messages_and_max_tokens() {
        let msgs: Vec<_> = (0..3)
            .map(|_| serde_json::json!({"role": "user", "content": "x"}))
            .collect();
        let wire = |max_tokens: u32| {
            serde_json::from_value(
                serde_json::json!({"model": "m", "messages": msgs, "max_tokens": max_tokens}),
            )
            .unwrap()
        };
        let mut limits = LimitsConfig {
            max_messages: 2,
            ..LimitsConfig::default()
        };
        assert!(matches!(
            validate(wire(5), &limits),
            Err(DuetError::InvalidRequest { .. })
        ));
        limits.max_messages = 10;
        limits.max_tokens = 100;
        assert_eq!(
            validate(wire(500), &limits).unwrap().generation.max_tokens,
            Some(100),
            "clamped"
        );
        limits.clamp_max_tokens = false;
        match validate(wire(500), &limits) {
            Err(e) => assert!(e.to_string().contains("limits.max_tokens"), "{e}"),
            Ok(_) => panic!("refused when not clamping"),
        }
    }
}
