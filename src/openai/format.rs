//! `response_format`: plain text, any JSON object, or JSON following a schema; every
//! malformed field a 400 that names it. Whether a schema can be followed at all is the
//! student's to say (its grammar compiler answers with the reason).

use serde_json::{Value, json};

use crate::backend::Grammar;
use crate::error::DuetError;

/// The grammar `response_format` asks for (`None`: plain text).
pub fn response_format(format: &Value) -> Result<Option<Grammar>, DuetError> {
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        DuetError::invalid(
            "response_format.type",
            "`response_format` needs a `type`: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::Json(json!({ "type": "object" })))),
        "json_schema" => {
            let spec = format
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    DuetError::invalid(
                        "response_format.json_schema",
                        "`json_schema` must be an object with a `name` and the schema under `schema`",
                    )
                })?;
            match spec.get("name") {
                Some(Value::String(name))
                    if !name.is_empty()
                        && name.len() <= 64
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                _ => {
                    return Err(DuetError::invalid(
                        "response_format.json_schema.name",
                        "`name` must be 1 to 64 letters, digits, underscores or dashes",
                    ));
                }
            }
            match spec.get("schema") {
                None => Ok(Some(Grammar::Json(json!({})))),
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(Some(Grammar::Json(schema.clone())))
                }
                Some(_) => Err(DuetError::invalid(
                    "response_format.json_schema.schema",
                    "`schema` must be a JSON Schema object",
                )),
            }
        }
        other => Err(DuetError::invalid(
            "response_format.type",
            format!("`{other}` is not a response format; use text, json_object or json_schema"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_becomes_its_grammar_and_bad_ones_name_the_field() {
        assert_eq!(response_format(&json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            response_format(&json!({"type": "json_object"})).unwrap(),
            Some(Grammar::Json(json!({"type": "object"})))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            response_format(&json!({"type": "json_schema",
                "json_schema": {"name": "thing", "strict": true, "schema": schema}}))
            .unwrap(),
            Some(Grammar::Json(schema))
        );
        for (format, param) in [
            (json!({}), "response_format.type"),
            (json!({"type": "xml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
                "response_format.json_schema.schema",
            ),
        ] {
            match response_format(&format) {
                Err(DuetError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{format}")
                }
                other => panic!("{format}: {other:?}"),
            }
        }
    }
}
