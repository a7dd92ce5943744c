//! OpenAI's legacy `POST /v1/completions`: its wire types, and their validation into one
//! [`GenerationRequest`] per prompt (a list of prompts gets one choice each). A `suffix`
//! makes a fill-in-the-middle prompt from the model's own FIM tokens.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::fields::{self, SamplingFields};
use super::types::{StopField, StreamOptions};
use crate::backend::{GenerationRequest, Infill, Prompt};
use crate::config::LimitsConfig;
use crate::error::DuetError;

/// `max_tokens` when a request gives none, as OpenAI does.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// Stop strings a request may give: more than OpenAI's 4, since code completion clients
/// send up to 9.
pub const MOST_STOP_SEQUENCES: usize = 16;
/// Prompts one request may hold.
pub const MOST_PROMPTS: usize = 16;
/// Log probability alternatives a request may ask for, as OpenAI allows.
pub const MOST_LOGPROBS: i64 = 5;

/// The body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Option<PromptField>,
    pub suffix: Option<String>,
    pub max_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Fields duet does not interpret itself (user, keep_alive, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `prompt`: text, several texts, token ids, or several lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// A validated completion request plus what the HTTP edge itself needs.
#[derive(Debug)]
pub struct ValidCompletionRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// One per prompt, in order: choice `i` answers prompt `i`.
    pub generations: Vec<GenerationRequest>,
}

pub fn validate_completion(
    req: CompletionRequest,
    limits: &LimitsConfig,
) -> Result<ValidCompletionRequest, DuetError> {
    for (field, n) in [("n", req.n), ("best_of", req.best_of)] {
        if let Some(n) = n
            && n != 1
        {
            return Err(DuetError::unsupported(
                field,
                format!("{field} must be 1 (got {n}): duet generates one choice per prompt"),
            ));
        }
    }
    let prompts = match req.prompt {
        None => return Err(DuetError::invalid("prompt", "`prompt` is required")),
        Some(PromptField::Text(text)) => vec![Prompt::Text(text)],
        Some(PromptField::Texts(texts)) => texts.into_iter().map(Prompt::Text).collect(),
        Some(PromptField::Tokens(ids)) => vec![Prompt::Tokens(ids)],
        Some(PromptField::TokenLists(lists)) => lists.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() || prompts.len() > MOST_PROMPTS {
        return Err(DuetError::invalid(
            "prompt",
            format!(
                "send between 1 and {MOST_PROMPTS} prompts (got {})",
                prompts.len()
            ),
        ));
    }
    if prompts
        .iter()
        .any(|p| matches!(p, Prompt::Tokens(ids) if ids.is_empty()))
    {
        return Err(DuetError::invalid("prompt", "a prompt of no tokens"));
    }
    let prompts = match req.suffix {
        None => prompts,
        Some(_) if req.echo => {
            return Err(DuetError::invalid(
                "echo",
                "`echo` cannot be combined with `suffix`",
            ));
        }
        Some(suffix) => prompts
            .into_iter()
            .map(|p| match p {
                Prompt::Text(prefix) => Ok(Prompt::Infill(Infill {
                    prefix,
                    suffix: suffix.clone(),
                    ..Infill::default()
                })),
                _ => Err(DuetError::invalid(
                    "suffix",
                    "`suffix` needs the prompt as text, not token ids",
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let logprobs = match req.logprobs {
        None => None,
        Some(n @ 0..=MOST_LOGPROBS) => Some(n as usize),
        Some(n) => {
            return Err(DuetError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MOST_LOGPROBS} (got {n})"),
            ));
        }
    };
    let sampling = fields::sampling(&req.sampling)?;
    // OpenAI's default of 16 applies before the server's cap does.
    let asked = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS as i64);
    let max_tokens =
        fields::max_tokens("max_tokens", Some(asked), 0, limits)?.unwrap_or(DEFAULT_MAX_TOKENS);
    let stop = fields::stop(req.stop, MOST_STOP_SEQUENCES)?;
    let keep_alive = fields::keep_alive(&req.extra)?;
    let generations = prompts
        .into_iter()
        .map(|prompt| GenerationRequest {
            sampling: sampling.clone(),
            max_tokens: Some(max_tokens),
            stop: stop.clone(),
            keep_alive,
            logprobs,
            echo: req.echo,
            ..GenerationRequest::new(prompt)
        })
        .collect();
    Ok(ValidCompletionRequest {
        model: req.model,
        stream: req.stream,
        include_usage: req.stream && req.stream_options.is_some_and(|o| o.include_usage),
        generations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<ValidCompletionRequest, DuetError> {
        validate_completion(
            serde_json::from_value(body).expect("wire shape"),
            &LimitsConfig::default(),
        )
    }

    #[test]
    fn every_prompt_shape_gives_one_generation_each() {
        let cases = [
            (json!("hi"), 1),
            (json!(["a", "b", "c"]), 3),
            (json!([1, 2, 3]), 1),
            (json!([[1], [2, 3]]), 2),
        ];
        for (prompt, n) in cases {
            let r = parse(json!({"model": "m", "prompt": prompt})).unwrap();
            assert_eq!(r.generations.len(), n, "{prompt}");
            assert_eq!(r.generations[0].max_tokens, Some(DEFAULT_MAX_TOKENS));
        }
    }

    #[test]
    fn a_suffix_makes_a_fill_in_the_middle_prompt() {
        let r = parse(json!({"model": "m", "prompt": "def f(", "suffix": ")\n"})).unwrap();
        assert_eq!(
            r.generations[0].prompt,
            Prompt::Infill(Infill {
                prefix: "def f(".into(),
                suffix: ")\n".into(),
                ..Infill::default()
            })
        );
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        let nine_stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let cases = [
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": []}), "prompt"),
            (json!({"model": "m", "prompt": "x", "n": 2}), "n"),
            (
                json!({"model": "m", "prompt": "x", "best_of": 3}),
                "best_of",
            ),
            (
                json!({"model": "m", "prompt": "x", "logprobs": 6}),
                "logprobs",
            ),
            (
                json!({"model": "m", "prompt": "x", "stop": nine_stops}),
                "stop",
            ),
            (
                json!({"model": "m", "prompt": [1, 2], "suffix": "y"}),
                "suffix",
            ),
            (
                json!({"model": "m", "prompt": "x", "suffix": "y", "echo": true}),
                "echo",
            ),
            (
                json!({"model": "m", "prompt": "x", "max_tokens": -1}),
                "max_tokens",
            ),
        ];
        for (body, param) in cases {
            match parse(body.clone()) {
                Err(DuetError::InvalidRequest { param: Some(p), .. })
                | Err(DuetError::Unsupported { param: p, .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("expected a 400 about {param}, got {other:?}"),
            }
        }
    }
}
