//! Fuzzes request parsing and validation: any body must parse into a request or an error,
//! never a panic, and a valid request must respect the limits it was checked against.
#![no_main]

use duet::config::LimitsConfig;
use duet::openai::types::ChatCompletionRequest;
use duet::openai::validate::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(body) else { return };
    let limits = LimitsConfig { max_messages: 16, max_tokens: 64, ..LimitsConfig::default() };
    if let Ok(valid) = validate(request, &limits) {
        assert!(!valid.generation.messages.is_empty() && valid.generation.messages.len() <= 16);
        assert!(valid.generation.max_tokens.is_some_and(|n| (1..=64).contains(&n)));
        assert!(valid.generation.stop.len() <= 4);
    }
});
