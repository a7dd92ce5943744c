//! The OpenAI wire format: request and response types, their validation into duet's
//! internal request, and Server-Sent Events framing. Nothing past the HTTP edge sees these.

pub mod sse;
pub mod types;
pub mod validate;
