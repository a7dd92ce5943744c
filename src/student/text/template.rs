//! The chat template: the GGUF's `tokenizer.chat_template` (Jinja), rendered with
//! minijinja the way Hugging Face's `apply_chat_template` does, and the end-of-turn marker
//! the template writes after a message.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value, context};

use crate::backend::ChatMessage;

use crate::error::DuetError;

/// A compiled chat template with the special-token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template lays out `tools` itself (Qwen2.5's does; SmolLM2's does not).
    takes_tools: bool,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the texts of the model's BOS and EOS tokens.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, DuetError> {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with these Jinja settings.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build();
        env.set_syntax(syntax.map_err(|e| DuetError::Internal(e.to_string()))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| {
                DuetError::ModelLoad(format!("the model's chat template does not compile: {e}"))
            })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            takes_tools: source.contains("tools"),
        })
    }

    /// The prompt for `messages`, ending with the cue for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, DuetError> {
        self.render_with(messages, None, true)
    }

    /// [`render`](Self::render) with `tools` (OpenAI's tool objects) offered to the model:
    /// laid out by the template when it knows how, otherwise described in the system message
    /// with the `<tool_call>` format (Qwen's and Hermes's), earlier calls written out in it.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String, DuetError> {
        if self.takes_tools {
            return self.render_with(messages, Some(tools), true);
        }
        self.render_with(&described_tools(messages, tools), None, true)
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, DuetError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| DuetError::Internal(e.to_string()))?;
        template
            .render(context! {
                messages => Value::from(Serde(messages)),
                tools => tools.map(|t| Value::from(Serde(t))),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| {
                // A template's own raise_exception is a verdict on the conversation.
                if e.kind() == ErrorKind::InvalidOperation {
                    DuetError::InvalidRequest {
                        message: format!(
                            "the model's chat template refused these messages: {}",
                            e.detail().unwrap_or("")
                        ),
                        param: Some("messages".into()),
                    }
                } else {
                    DuetError::Internal(format!("chat template: {e}"))
                }
            })
    }

    /// The text the template writes right after an assistant message's content (such as
    /// `<|im_end|>`): the model ends its turn by generating it. Found by rendering a
    /// conversation with a marker as the assistant's reply.
    pub fn end_of_turn_text(&self) -> Option<String> {
        const MARK: &str = "\u{1}duet-end-of-turn\u{1}";
        let messages = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", MARK),
        ];
        let text = self.render_with(&messages, None, false).ok()?;
        let after = &text[text.find(MARK)? + MARK.len()..];
        let trimmed = after.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        (end > 0).then(|| trimmed[..end].to_string())
    }
}

/// `messages` for a template that knows nothing of tools: the tools and how to call them
/// in the system message, and each earlier call written out as the model would write it.
fn described_tools(messages: &[ChatMessage], tools: &[serde_json::Value]) -> Vec<ChatMessage> {
    let mut listing = String::from(
        "You may call functions to help with the user's request. They are, one per line:\n",
    );
    for tool in tools {
        listing.push_str(&tool["function"].to_string());
        listing.push('\n');
    }
    listing.push_str(
        "To call one, answer with exactly:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <the arguments as a JSON object>}\n</tool_call>\nOtherwise answer normally.",
    );
    let (system, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => {
            (format!("{}\n\n{listing}", first.content), rest)
        }
        _ => (listing, messages),
    };
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(ChatMessage::new("system", system));
    for m in rest {
        let mut m = m.clone();
        for call in std::mem::take(&mut m.tool_calls) {
            m.content.push_str(&format!(
                "<tool_call>\n{}\n</tool_call>\n",
                serde_json::json!({"name": call["function"]["name"], "arguments": call["function"]["arguments"]})
            ));
        }
        out.push(m);
    }
    out
}
