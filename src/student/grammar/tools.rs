//! The grammar of an answer that may call tools: free text or calls, each call
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Qwen2.5's and Hermes's
//! format) or, with `tool_choice: auto`, one bare `{"name": ..., "arguments": ...}`, its JSON
//! held to one of the functions' schemas. `<tool_call>` is the model's own
//! special token where it has one (text can never spell it, so free text needs no guard);
//! otherwise the same words as text, and free text may not contain them.

use llguidance::api::TopLevelGrammar;
use serde_json::{Value, json};

use super::WHITESPACE;
use crate::backend::{ToolChoice, ToolUse};

/// The grammar for `tools`; `native`: the model has `<tool_call>` and `</tool_call>` tokens.
pub fn grammar(tools: &ToolUse, native: bool) -> TopLevelGrammar {
    let functions: Vec<Value> = tools
        .functions
        .iter()
        .filter(|(name, _)| match &tools.choice {
            ToolChoice::Function(chosen) => chosen == name,
            _ => true,
        })
        .map(|(name, parameters)| {
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = json!({"anyOf": functions, "x-guidance": {"whitespace_pattern": WHITESPACE, "lenient": true}});
    let several = tools.parallel && !matches!(tools.choice, ToolChoice::Function(_));
    // Free text may not open with `{`: an answer that does is a call written bare (as
    // Qwen2.5-Coder often writes one), held to the functions' schemas.
    let (open, close, text) = if native {
        ("<tool_call>", "</tool_call>", r"/[^{](.|\n)*/")
    } else {
        (
            r#""<tool_call>""#,
            r#""</tool_call>""#,
            r"/[^{](.|\n)*/ & ~/(?s:.*)<tool_call>(?s:.*)/",
        )
    };
    let start = match (&tools.choice, native) {
        (ToolChoice::Auto, true) => "start: TEXT | calls | TEXT calls | body",
        (ToolChoice::Auto, false) => "start: TEXT | calls | body",
        _ => "start: calls",
    };
    let calls = if several {
        r#"calls: call ("\n" call)*"#
    } else {
        "calls: call"
    };
    TopLevelGrammar::from_lark(format!(
        "{start}\n{calls}\ncall: {open} \"\\n\" body \"\\n\" {close}\nbody: %json {call}\nTEXT: {text}\n"
    ))
}
