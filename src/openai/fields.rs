//! Checks of the fields chat and legacy completions share (sampling, `max_tokens`, `stop`,
//! `logit_bias`, `keep_alive`): each refusal a 400 that names the field and says why.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::types::StopField;
use crate::backend::SamplingParams;
use crate::config::LimitsConfig;
use crate::error::DuetError;
use crate::memory::KeepAlive;

/// The sampling fields every completion API shares, as sent; each request type embeds them
/// with `#[serde(flatten)]`.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; as llama.cpp's server and vLLM accept it.
    pub top_k: Option<i64>,
    /// Not in OpenAI's API either (llama.cpp and vLLM).
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// `{"token id": bias}`, or llama.cpp's `[[token id, bias], ...]`.
    pub logit_bias: Option<Value>,
}

/// Sampling settings; a field left out stays `None` for the model's defaults.
pub fn sampling(f: &SamplingFields) -> Result<SamplingParams, DuetError> {
    let temperature = in_range("temperature", f.temperature, 0.0, 2.0)?;
    let top_p = in_range("top_p", f.top_p, 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(DuetError::invalid("top_p", "top_p must be greater than 0"));
    }
    let min_p = in_range("min_p", f.min_p, 0.0, 1.0)?;
    let presence_penalty =
        in_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty =
        in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let top_k = match f.top_k {
        None => None,
        Some(0) | Some(-1) => Some(0), // "off" in llama.cpp and vLLM
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(DuetError::invalid(
                "top_k",
                format!("top_k must be positive (got {k})"),
            ));
        }
    };
    let logit_bias = match &f.logit_bias {
        None | Some(Value::Null) => vec![],
        Some(v) => logit_bias(v)?,
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        presence_penalty,
        frequency_penalty,
        // Any 64-bit seed is a seed: negative ones map one-to-one onto the upper half.
        seed: f.seed.map(|s| s as u64),
        logit_bias,
    })
}

/// `logit_bias`: an object from token ids (as strings) to biases between -100 and 100, or
/// llama.cpp's list of `[token id, bias]` pairs.
fn logit_bias(v: &Value) -> Result<Vec<(u32, f32)>, DuetError> {
    let bad = |why: String| DuetError::invalid("logit_bias", why);
    let pairs: Vec<(String, &Value)> = match v {
        Value::Object(map) => map.iter().map(|(id, b)| (id.clone(), b)).collect(),
        Value::Array(list) => list
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([Value::Number(id), bias]) => Ok((id.to_string(), bias)),
                _ => Err(bad(
                    "logit_bias must be {\"token\": bias} or [[token, bias], ...]".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("logit_bias must map token ids to biases".into())),
    };
    pairs
        .into_iter()
        .map(|(id, bias)| {
            let id: u32 = id
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{id}` is not a token id")))?;
            let bias = bias
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    bad(format!(
                        "the bias of token {id} must be a number between -100 and 100"
                    ))
                })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// `max_tokens` (or `max_completion_tokens`, named `field`) checked against the input
/// limits; `least` is the smallest value allowed (0 lets a request only read its prompt).
pub fn max_tokens(
    field: &str,
    value: Option<i64>,
    least: i64,
    limits: &LimitsConfig,
) -> Result<Option<usize>, DuetError> {
    Ok(match value {
        Some(n) if n < least => {
            return Err(DuetError::invalid(
                field,
                format!("{field} must be at least {least} (got {n})"),
            ));
        }
        Some(n) if limits.max_tokens > 0 && n as usize > limits.max_tokens => {
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
        Some(n) => Some(n as usize),
        None if limits.max_tokens > 0 => Some(limits.max_tokens),
        None => None,
    })
}

/// `stop`: a string or a list of at most `most` non-empty strings.
pub fn stop(value: Option<StopField>, most: usize) -> Result<Vec<String>, DuetError> {
    let stop = match value {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > most {
        return Err(DuetError::invalid(
            "stop",
            format!(
                "at most {most} stop sequences are allowed (got {})",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(DuetError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop)
}

/// `keep_alive` (as in Ollama), among the fields duet does not otherwise interpret.
pub fn keep_alive(extra: &Map<String, Value>) -> Result<Option<KeepAlive>, DuetError> {
    match extra.get("keep_alive") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(
            KeepAlive::from_json(v).map_err(|why| DuetError::invalid("keep_alive", why))?,
        )),
    }
}

/// Refuses fields a local model cannot honour, so the client is told instead of ignored.
pub fn refuse_unsupported(
    extra: &Map<String, Value>,
    unsupported: &[(&str, &str)],
) -> Result<(), DuetError> {
    for (field, why) in unsupported {
        match extra.get(*field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => return Err(DuetError::unsupported(field, *why)),
        }
    }
    Ok(())
}

pub fn in_range(
    field: &str,
    value: Option<f32>,
    min: f32,
    max: f32,
) -> Result<Option<f32>, DuetError> {
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
    use serde_json::json;

    #[test]
    fn logit_bias_maps_token_ids_to_biases() {
        let params = sampling(&SamplingFields {
            logit_bias: Some(json!({"15": -100, "7": 2.5})),
            ..SamplingFields::default()
        })
        .unwrap();
        let mut got = params.logit_bias;
        got.sort_by_key(|&(id, _)| id);
        assert_eq!(got, vec![(7, 2.5), (15, -100.0)]);
        let pairs = sampling(&SamplingFields {
            logit_bias: Some(json!([[15, -100.0]])),
            ..SamplingFields::default()
        })
        .unwrap();
        assert_eq!(pairs.logit_bias, vec![(15, -100.0)], "llama.cpp's pairs");
        for bad in [json!({"x": 1}), json!({"1": 101}), json!([1]), json!("x")] {
            let e = sampling(&SamplingFields {
                logit_bias: Some(bad),
                ..SamplingFields::default()
            })
            .unwrap_err();
            assert!(
                matches!(e, DuetError::InvalidRequest { param: Some(ref p), .. } if p == "logit_bias")
            );
        }
    }
}
