//! One check that the real model's answer is right, not merely well-formed: Qwen2.5-0.5B,
//! greedy, knows the capital of France (SmolLM2-135M does not).

mod common;

use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::{QWEN, client, config_for, model_id, spawn};

#[tokio::test]
async fn qwen_names_paris() {
    let base = spawn(config_for(QWEN));
    let req = CreateChatCompletionRequestArgs::default()
        .model(model_id(QWEN))
        .messages(vec![
            ChatCompletionRequestUserMessageArgs::default()
                .content("What is the capital of France?")
                .build()
                .unwrap()
                .into(),
        ])
        .temperature(0.0)
        .max_tokens(32u32)
        .build()
        .unwrap();
    let resp = client(&base).chat().create(req).await.unwrap();
    let answer = resp.choices[0].message.content.clone().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(
        resp.usage.unwrap().prompt_tokens,
        36,
        "llama.cpp counts 36 prompt tokens"
    );
}
