//! The OpenAI wire format: request and response types, their validation into duet's
//! internal request, and Server-Sent Events framing. Nothing past the HTTP edge sees these.
//!
//! - [`types`]: chat completions' wire types and what the APIs share (usage, finish reason);
//! - [`validate`]: a chat request into a conversation;
//! - [`completions`]: legacy completions' wire types and their validation;
//! - [`fields`]: checks of the fields both share (sampling, `max_tokens`, `stop`, ...);
//! - [`format`]: `response_format` into the grammar the output must follow;
//! - [`tools`]: `tools` and `tool_choice` into the functions the model may call;
//! - [`sse`]: event framing.

pub mod completions;
pub mod fields;
pub mod format;
pub mod sse;
pub mod tools;
pub mod types;
pub mod validate;
