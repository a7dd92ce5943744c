//! llama.cpp server's native API, as IDE plugins send it (llama.vim and llama.vscode's
//! `/infill`, Tabby's, Continue's and Twinny's `/completion`): its request fields, and their
//! validation into a [`GenerationRequest`]. llama.cpp's tuning knobs that only concern its
//! own engine (`cache_prompt`: duet always keeps prompts; `samplers`, `t_max_prompt_ms`,
//! `id_slot`) are accepted and have no effect.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::backend::{ExtraFile, GenerationRequest, Infill, Prompt};
use crate::config::LimitsConfig;
use crate::error::DuetError;
use crate::openai::fields::{self, SamplingFields};
use crate::openai::types::StopField;

/// Stop strings a request may give.
const MOST_STOP_SEQUENCES: usize = 16;
/// Alternatives `n_probs` may ask for.
const MOST_PROBS: i64 = 20;
/// Files `input_extra` may hold (llama.vim sends up to 64 chunks by default).
const MOST_EXTRA_FILES: usize = 64;

/// The body of `POST /completion` and `POST /infill`.
#[derive(Debug, Default, Deserialize)]
pub struct NativeRequest {
    pub prompt: Option<NativePrompt>,
    pub input_prefix: Option<String>,
    pub input_suffix: Option<String>,
    #[serde(default)]
    pub input_extra: Vec<ExtraChunk>,
    /// Tokens to generate: -1 (or absent) for the server's default, 0 to read the prompt.
    pub n_predict: Option<i64>,
    /// OpenAI's name, which llama.cpp accepts too.
    pub max_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub stop: Option<StopField>,
    pub n_probs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    /// Stop generating this long after the first token.
    pub t_max_predict_ms: Option<i64>,
    /// Only these fields of the answer, by path (`timings/prompt_n`), as flat keys.
    pub response_fields: Option<Vec<String>>,
    /// Everything else (llama.cpp's own knobs).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// `prompt`: text or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum NativePrompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// One entry of `input_extra`: another file for context.
#[derive(Debug, Deserialize)]
pub struct ExtraChunk {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub filename: Option<String>,
}

/// What the handler needs besides the generation.
#[derive(Debug)]
pub struct ValidNative {
    pub stream: bool,
    pub response_fields: Option<Vec<String>>,
    pub generation: GenerationRequest,
}

/// `/completion`: `prompt` read as it is.
pub fn validate_completion(
    mut req: NativeRequest,
    limits: &LimitsConfig,
) -> Result<ValidNative, DuetError> {
    let prompt = match req.prompt.take() {
        Some(NativePrompt::Text(text)) => Prompt::Text(text),
        Some(NativePrompt::Tokens(ids)) if !ids.is_empty() => Prompt::Tokens(ids),
        _ => return Err(DuetError::invalid("prompt", "`prompt` is required")),
    };
    validate(prompt, req, limits)
}

/// `/infill`: the code around the cursor, `prompt` being what the completion starts with.
pub fn validate_infill(
    req: NativeRequest,
    limits: &LimitsConfig,
) -> Result<ValidNative, DuetError> {
    if req.input_extra.len() > MOST_EXTRA_FILES {
        return Err(DuetError::invalid(
            "input_extra",
            format!(
                "at most {MOST_EXTRA_FILES} files of context (got {})",
                req.input_extra.len()
            ),
        ));
    }
    let prompt = match &req.prompt {
        None => String::new(),
        Some(NativePrompt::Text(text)) => text.clone(),
        Some(NativePrompt::Tokens(_)) => {
            return Err(DuetError::invalid(
                "prompt",
                "/infill takes `prompt` as text",
            ));
        }
    };
    let infill = Infill {
        prefix: req.input_prefix.clone().unwrap_or_default(),
        suffix: req.input_suffix.clone().unwrap_or_default(),
        prompt,
        extra: req
            .input_extra
            .iter()
            .map(|chunk| ExtraFile {
                filename: chunk.filename.clone().unwrap_or_else(|| "tmp".into()),
                text: chunk.text.clone(),
            })
            .collect(),
        indent: req
            .extra
            .get("n_indent")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .map(|n| n as usize),
    };
    validate(Prompt::Infill(infill), req, limits)
}

fn validate(
    prompt: Prompt,
    req: NativeRequest,
    limits: &LimitsConfig,
) -> Result<ValidNative, DuetError> {
    let (field, n) = match (req.n_predict, req.max_tokens) {
        (Some(n), _) => ("n_predict", n),
        (None, Some(n)) => ("max_tokens", n),
        (None, None) => ("n_predict", -1),
    };
    let max_tokens = match n {
        -1 => fields::max_tokens(field, None, 0, limits)?,
        n => fields::max_tokens(field, Some(n), 0, limits)?,
    };
    let logprobs = match req.n_probs {
        None | Some(0) => None,
        Some(n @ 1..=MOST_PROBS) => Some(n as usize),
        Some(n) => {
            return Err(DuetError::invalid(
                "n_probs",
                format!("n_probs must be between 0 and {MOST_PROBS} (got {n})"),
            ));
        }
    };
    // llama.cpp's -1 asks for a random seed.
    let mut sampling = req.sampling;
    sampling.seed = sampling.seed.filter(|&s| s >= 0);
    let sampling = fields::sampling(&sampling)?;
    let time_limit = match req.t_max_predict_ms {
        None => None,
        Some(ms) if ms <= 0 => None,
        Some(ms) => Some(Duration::from_millis(ms as u64)),
    };
    Ok(ValidNative {
        stream: req.stream,
        response_fields: req.response_fields,
        generation: GenerationRequest {
            sampling,
            max_tokens,
            stop: fields::stop(req.stop, MOST_STOP_SEQUENCES)?,
            keep_alive: fields::keep_alive(&req.extra)?,
            logprobs,
            time_limit,
            ..GenerationRequest::new(prompt)
        },
    })
}

/// Picks `paths` out of `answer` as llama.cpp's `response_fields` does: each path
/// (`timings/prompt_n`) becomes a flat key holding the value found there.
pub fn pick_fields(answer: &Value, paths: &[String]) -> Value {
    let picked = paths
        .iter()
        .filter_map(|path| {
            let value = path
                .split('/')
                .try_fold(answer, |v, key| v.get(key))?
                .clone();
            Some((path.clone(), value))
        })
        .collect();
    Value::Object(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn infill(body: Value) -> Result<ValidNative, DuetError> {
        validate_infill(
            serde_json::from_value(body).unwrap(),
            &LimitsConfig::default(),
        )
    }

    #[test]
    fn an_infill_request_as_llama_vim_sends_it() {
        let v = infill(json!({
            "input_prefix": "def add(a, b):\n", "input_suffix": "\nprint(add(1, 2))\n",
            "input_extra": [{"text": "x = 1\n", "filename": "util.py", "time": 3}],
            "prompt": "    ", "n_predict": 64, "n_indent": 4, "top_k": 40, "top_p": 0.99,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": true,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1500,
            "response_fields": ["content", "timings/prompt_n"]
        }))
        .unwrap();
        let Prompt::Infill(i) = &v.generation.prompt else {
            panic!("an infill prompt")
        };
        assert_eq!(i.prompt, "    ");
        assert_eq!(i.extra[0].filename, "util.py");
        assert_eq!(v.generation.max_tokens, Some(64));
        assert_eq!(v.generation.time_limit, Some(Duration::from_millis(1500)));
        let warm_up = infill(json!({"input_prefix": "x", "n_predict": 0, "samplers": []})).unwrap();
        assert_eq!(warm_up.generation.max_tokens, Some(0));
    }

    #[test]
    fn response_fields_are_flat_paths() {
        let answer = json!({"content": "x", "timings": {"prompt_n": 3}, "truncated": false});
        let fields = ["content", "timings/prompt_n", "missing/key"].map(String::from);
        assert_eq!(
            pick_fields(&answer, &fields),
            json!({"content": "x", "timings/prompt_n": 3})
        );
    }

    #[test]
    fn llama_cpp_logit_bias_pairs_are_read() {
        let v = validate_completion(
            serde_json::from_value(json!({"prompt": "x", "logit_bias": [[15, -100.0]]})).unwrap(),
            &LimitsConfig::default(),
        )
        .unwrap();
        assert_eq!(v.generation.sampling.logit_bias, vec![(15, -100.0)]);
    }
}
