//! Turning a wire request into a [`GenerationRequest`]: every field checked, every
//! refusal a 400 that names the field and says why.

use super::types::{ChatCompletionRequest, MessageContent, StopField};
use crate::backend::{ChatMessage, GenerationRequest, SamplingParams};
use crate::config::LimitsConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

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
    ("tools", "tool calling is not supported by the local model"),
    (
        "functions",
        "function calling is not supported by the local model",
    ),
    ("logprobs", "logprobs are not supported by the local model"),
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
    for (field, why) in UNSUPPORTED {
        match req.extra.get(*field) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
            Some(_) => return Err(DuetError::unsupported(field, *why)),
        }
    }
    if let Some(format) = req.extra.get("response_format") {
        let kind = format.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if kind != "text" {
            return Err(DuetError::unsupported(
                "response_format",
                format!(
                    "response_format `{kind}` is not supported by the local model; only `text` is"
                ),
            ));
        }
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
                "tool" | "function" => {
                    return Err(DuetError::unsupported(&param, format!("role `{}` needs tool calling, which the local model does not support", m.role)));
                }
                other => {
                    return Err(DuetError::invalid(&param, format!("unknown role `{other}`; expected system, developer, user or assistant")));
                }
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
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let temperature = in_range("temperature", req.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = in_range("top_p", req.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(DuetError::invalid("top_p", "top_p must be greater than 0"));
    }
    let presence_penalty =
        in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty =
        in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let top_k = match req.top_k {
        None | Some(0) | Some(-1) => None, // 0 and -1 mean "off" in llama.cpp and vLLM
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(DuetError::invalid(
                "top_k",
                format!("top_k must be positive (got {k})"),
            ));
        }
    };

    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((field, n)) if n < 1 => {
            return Err(DuetError::invalid(
                field,
                format!("{field} must be at least 1 (got {n})"),
            ));
        }
        Some((field, n)) if limits.max_tokens > 0 && n as usize > limits.max_tokens => {
            if !limits.clamp_max_tokens {
                return Err(DuetError::invalid(
                    field,
                    format!(
                        "{field} {n} is over the limit of {} (limits.max_tokens)",
                        limits.max_tokens
                    ),
                ));
            }
            Some(limits.max_tokens)
        }
        Some((_, n)) => Some(n as usize),
        None if limits.max_tokens > 0 => Some(limits.max_tokens),
        None => None,
    };

    let stop = match req.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(DuetError::invalid(
            "stop",
            format!("at most 4 stop sequences are allowed (got {})", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(DuetError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }

    let keep_alive = match req.extra.get("keep_alive") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            Some(KeepAlive::from_json(v).map_err(|why| DuetError::invalid("keep_alive", why))?)
        }
    };

    Ok(ValidChatRequest {
        model: req.model,
        stream: req.stream,
        include_usage: req.stream && req.stream_options.is_some_and(|o| o.include_usage),
        generation: GenerationRequest {
            messages,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                presence_penalty,
                frequency_penalty,
                seed: req.seed.map(|s| s as u64),
            },
            max_tokens,
            stop,
            keep_alive,
        },
    })
}

fn in_range(field: &str, value: Option<f32>, min: f32, max: f32) -> Result<Option<f32>, DuetError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(DuetError::invalid(
            field,
            format!("{field} must be between {min} and {max} (got {v})"),
        )),
        v => Ok(v),
    }
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
        assert_eq!(r.generation.sampling.temperature, 1.0);
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
        assert_eq!(r.generation.messages[0].role, "system");
        assert_eq!(r.generation.messages[1].content, "ab");
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
                "tools",
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
