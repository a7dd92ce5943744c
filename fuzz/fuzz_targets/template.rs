//! Fuzzes chat-template rendering with hostile message contents: the real templates of
//! both test models must render any text as text (never as template code), without panics.
#![no_main]

use std::sync::OnceLock;

use duet::backend::ChatMessage;
use duet::student::load::gguf::{self, GgufHeader};
use duet::student::text::template::ChatTemplate;
use libfuzzer_sys::fuzz_target;

fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        ["SmolLM2-135M-Instruct.Q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
            .iter()
            .map(|file| {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(file);
                let header = GgufHeader::read(&path).expect("run scripts/fetch-models.sh first");
                let source = gguf::string(header.metadata(), "tokenizer.chat_template").unwrap();
                ChatTemplate::new(&source, "<s>".into(), "<|im_end|>".into()).unwrap()
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let roles = ["system", "user", "assistant", "user"];
    let messages: Vec<ChatMessage> = text
        .split('\u{0}')
        .zip(roles.iter().cycle())
        .map(|(content, role)| ChatMessage { role: role.to_string(), content: content.to_string() })
        .collect();
    for template in templates() {
        if let Ok(prompt) = template.render(&messages) {
            for m in &messages {
                assert!(prompt.contains(&m.content), "a message's text must appear verbatim");
            }
        }
    }
});
