//! Checks that the real model's answers are right, not merely well-formed: Qwen2.5-0.5B,
//! greedy, knows the capital of France (SmolLM2-135M does not), and the default model
//! answers a dozen everyday questions mostly right with the server's own default sampling.

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

/// A dozen everyday questions a newcomer asks first, six samples each with the server's
/// default sampling (fixed seeds, so the count is the same on every run of this build), and
/// words a right answer contains.
const QUESTIONS: [(&str, &[&str]); 12] = [
    ("What is the capital of France?", &["paris"]),
    ("How many days are there in a week?", &["7", "seven"]),
    ("What color is the sky on a clear day?", &["blue"]),
    ("What is 2 + 2?", &["4", "four"]),
    (
        "Which is the largest planet in our solar system?",
        &["jupiter"],
    ),
    (
        "At what temperature in Celsius does water freeze?",
        &["0", "zero"],
    ),
    ("Who wrote Romeo and Juliet?", &["shakespeare"]),
    ("How many legs does a spider have?", &["8", "eight"]),
    ("What do bees make?", &["honey"]),
    ("What is the opposite of hot?", &["cold"]),
    ("What is the chemical formula of water?", &["h2o", "h₂o"]),
    ("What is the first month of the year?", &["january"]),
];

#[tokio::test]
async fn the_default_model_answers_everyday_questions_mostly_right() {
    let mut config = duet::config::Config::default();
    config.server.port = 0;
    config.student.model = common::model_path(QWEN).display().to_string();
    assert_eq!(
        duet::config::Config::default().student.model,
        format!("models/{QWEN}"),
        "Qwen2.5-0.5B is the default model"
    );
    let base = spawn(config);
    let (mut right, mut total, mut wrong) = (0, 0, Vec::new());
    for (question, words) in QUESTIONS {
        for seed in 1..=6 {
            let body = serde_json::json!({
                "model": model_id(QWEN), "max_tokens": 48, "seed": seed,
                "messages": [{"role": "user", "content": question}],
            });
            let answer: serde_json::Value = common::post(&base, &body).await.json().await.unwrap();
            let text = answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_lowercase();
            total += 1;
            if words.iter().any(|w| text.contains(w)) {
                right += 1;
            } else {
                wrong.push(format!("{question} -> {text}"));
            }
        }
    }
    eprintln!("{right} of {total} right");
    assert!(
        right * 100 >= total * 80,
        "{right} of {total} right; wrong: {wrong:#?}"
    );
}
