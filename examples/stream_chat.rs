//! A streaming chat client for duet written with async-openai, the way any Rust program
//! that already talks to OpenAI would talk to duet: only the base URL changes.
//!
//! cargo run --release --example stream_chat -- "Write a haiku about the sea"
//! (DUET_URL defaults to http://127.0.0.1:8080/v1; DUET_MODEL to the first listed model.)

use std::io::Write;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::var("DUET_URL").unwrap_or_else(|_| "http://127.0.0.1:8080/v1".into());
    let prompt = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let prompt = if prompt.is_empty() {
        "Say hello in three languages.".to_string()
    } else {
        prompt
    };
    // duet needs no key unless its operator configured some; the SDK wants a value anyway.
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(base)
            .with_api_key("local"),
    );
    let model = match std::env::var("DUET_MODEL") {
        Ok(m) => m,
        Err(_) => client.models().list().await?.data.remove(0).id,
    };
    let request = CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages(vec![
            ChatCompletionRequestUserMessageArgs::default()
                .content(prompt)
                .build()?
                .into(),
        ])
        .max_tokens(256u32)
        .build()?;
    let mut stream = client.chat().create_stream(request).await?;
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        for choice in chunk?.choices {
            if let Some(text) = choice.delta.content {
                write!(out, "{text}")?;
                out.flush()?;
            }
        }
    }
    writeln!(out)?;
    Ok(())
}
