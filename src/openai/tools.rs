//! `tools`, `tool_choice` and `parallel_tool_calls` into the functions the model may call,
//! and the tool calls of an assistant message back into the conversation; every malformed
//! field a 400 that names it.

use serde_json::{Map, Value, json};

use crate::backend::{ToolChoice, ToolUse};
use crate::error::DuetError;

/// The functions a request offers (`None`: no tools, or `tool_choice: "none"`).
pub fn tool_use(extra: &Map<String, Value>) -> Result<Option<ToolUse>, DuetError> {
    let Some(tools) = extra.get("tools").filter(|t| !t.is_null()) else {
        if extra
            .get("tool_choice")
            .is_some_and(|c| !c.is_null() && c != "none")
        {
            return Err(DuetError::invalid(
                "tool_choice",
                "`tool_choice` needs `tools` to choose from",
            ));
        }
        return Ok(None);
    };
    let tools = tools
        .as_array()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| DuetError::invalid("tools", "`tools` must be a non-empty array"))?;
    let mut functions = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(DuetError::invalid(
                &format!("{param}.type"),
                "every tool must be of type `function`",
            ));
        }
        let function = tool
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| DuetError::invalid(&format!("{param}.function"), "must be an object"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| valid_name(n))
            .ok_or_else(|| {
                DuetError::invalid(
                    &format!("{param}.function.name"),
                    "must be 1 to 64 letters, digits, underscores or dashes",
                )
            })?;
        if functions.iter().any(|(n, _)| n == name) {
            return Err(DuetError::invalid(
                &format!("{param}.function.name"),
                format!("`{name}` names two tools"),
            ));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(schema @ Value::Object(_)) => schema.clone(),
            Some(_) => {
                return Err(DuetError::invalid(
                    &format!("{param}.function.parameters"),
                    "must be a JSON Schema object",
                ));
            }
        };
        functions.push((name.to_string(), parameters));
    }
    let choice = match extra.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            "none" => return Ok(None),
            other => {
                return Err(DuetError::invalid(
                    "tool_choice",
                    format!("`{other}` is not one of none, auto or required"),
                ));
            }
        },
        Some(choice) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    DuetError::invalid(
                        "tool_choice",
                        "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !functions.iter().any(|(n, _)| n == name) {
                return Err(DuetError::invalid(
                    "tool_choice",
                    format!("`{name}` is not one of the tools"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
    };
    // One call per answer unless the client asks for more (as llama.cpp's server does): a
    // small model allowed several tends to repeat its call until max_tokens.
    let parallel = match extra.get("parallel_tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(DuetError::invalid(
                "parallel_tool_calls",
                "must be true or false",
            ));
        }
    };
    Ok(Some(ToolUse {
        tools: tools.clone(),
        functions,
        choice,
        parallel,
    }))
}

/// The `tool_calls` of an assistant message as chat templates read them: `arguments` parsed
/// from OpenAI's JSON string into an object.
pub fn message_tool_calls(param: &str, calls: &Value) -> Result<Vec<Value>, DuetError> {
    let calls = calls
        .as_array()
        .ok_or_else(|| DuetError::invalid(&format!("{param}.tool_calls"), "must be an array"))?;
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("{param}.tool_calls[{j}]");
            let function = call.get("function").ok_or_else(|| {
                DuetError::invalid(&format!("{at}.function"), "each tool call needs a function")
            })?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    DuetError::invalid(&format!("{at}.function.name"), "must be a string")
                })?;
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str::<Value>(text).map_err(|e| {
                    DuetError::invalid(
                        &format!("{at}.function.arguments"),
                        format!("must be a JSON object written as a string: {e}"),
                    )
                })?,
                Some(object @ Value::Object(_)) => object.clone(),
                _ => {
                    return Err(DuetError::invalid(
                        &format!("{at}.function.arguments"),
                        "must be a JSON object written as a string",
                    ));
                }
            };
            Ok(json!({
                "id": call.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }))
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    }

    #[test]
    fn each_choice_is_read_and_none_drops_the_tools() {
        let tools = weather();
        let r = tool_use(&extra(json!({"tools": tools}))).unwrap().unwrap();
        assert_eq!((r.choice.clone(), r.parallel), (ToolChoice::Auto, false));
        assert_eq!(r.functions[0].0, "get_weather");
        let r = tool_use(&extra(json!({"tools": tools, "tool_choice": "required",
            "parallel_tool_calls": true})))
        .unwrap()
        .unwrap();
        assert_eq!((r.choice, r.parallel), (ToolChoice::Required, true));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let r = tool_use(&extra(json!({"tools": tools, "tool_choice": named})))
            .unwrap()
            .unwrap();
        assert_eq!(r.choice, ToolChoice::Function("get_weather".into()));
        assert!(
            tool_use(&extra(json!({"tools": tools, "tool_choice": "none"})))
                .unwrap()
                .is_none()
        );
        assert!(tool_use(&extra(json!({}))).unwrap().is_none());
    }

    #[test]
    fn malformed_tools_name_their_field() {
        for (body, param) in [
            (json!({"tools": []}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 1}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": weather(), "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": weather(), "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ] {
            match tool_use(&extra(body.clone())) {
                Err(DuetError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn call_arguments_are_parsed_for_the_template() {
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
        let parsed = message_tool_calls("messages[1]", &calls).unwrap();
        assert_eq!(parsed[0]["function"]["arguments"]["city"], "Paris");
        let bad = json!([{"function": {"name": "f", "arguments": "{nope"}}]);
        match message_tool_calls("messages[1]", &bad) {
            Err(DuetError::InvalidRequest { param: Some(p), .. }) => {
                assert_eq!(p, "messages[1].tool_calls[0].function.arguments")
            }
            other => panic!("{other:?}"),
        }
    }
}
