//! The tokenizer built from each real GGUF's metadata against llama.cpp's reference ids,
//! and each model's own chat template rendered with minijinja.

mod common;

use common::{QWEN, SMOLLM2, model_path};
use duet::backend::{ChatMessage, Prompt};
use duet::student::load::LoadedModel;
use duet::student::load::gguf::GgufHeader;
use duet::student::load::vocabulary::load_tokenizer;
use duet::student::text::template::ChatTemplate;
use duet::student::text::tokenizer::StudentTokenizer;

fn tokenizer(file: &str) -> StudentTokenizer {
    let path = model_path(file);
    load_tokenizer(&path, &GgufHeader::read(&path).unwrap()).unwrap()
}

fn template(file: &str, tok: &StudentTokenizer) -> ChatTemplate {
    let path = model_path(file);
    let header = GgufHeader::read(&path).unwrap();
    let source =
        duet::student::load::gguf::string(header.metadata(), "tokenizer.chat_template").unwrap();
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    ChatTemplate::new(&source, text(tok.bos), text(tok.eos)).unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// Reference ids from llama.cpp (no special tokens, no BOS).
const CASES: [&str; 3] = [
    "Hello, world!",
    "用中文写一句问候语😀",
    "  def f(x):\n\treturn x**2  # 12345",
];

#[test]
fn smollm2_ids_match_llama_cpp() {
    let t = tokenizer(SMOLLM2);
    let expected: [&[u32]; 3] = [
        &[19556, 28, 905, 17],
        &[
            23088, 28589, 29184, 33031, 243, 22924, 12034, 115, 33331, 123, 33945, 243, 16313, 251,
            10813, 242, 218,
        ],
        &[
            216, 753, 275, 24, 104, 727, 198, 197, 5406, 1792, 828, 34, 216, 907, 216, 33, 34, 35,
            36, 37,
        ],
    ];
    for (text, ids) in CASES.iter().zip(expected) {
        assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn qwen_ids_match_llama_cpp() {
    let t = tokenizer(QWEN);
    let expected: [&[u32]; 3] = [
        &[9707, 11, 1879, 0],
        &[11622, 104811, 61443, 104670, 113940, 72881, 141334],
        &[
            220, 707, 282, 2075, 982, 853, 856, 334, 17, 220, 671, 220, 16, 17, 18, 19, 20,
        ],
    ];
    for (text, ids) in CASES.iter().zip(expected) {
        assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn token_bytes_round_trip_ascii_chinese_and_emoji() {
    for file in [SMOLLM2, QWEN] {
        let t = tokenizer(file);
        for text in CASES.iter().chain(&["naïve café — ½ 🚀🇫🇷 日本語テキスト"])
        {
            let bytes: Vec<u8> = t
                .encode(text)
                .unwrap()
                .iter()
                .flat_map(|&id| t.bytes(id).to_vec())
                .collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), *text, "{file}");
        }
    }
}

#[test]
fn special_tokens_are_single_ids() {
    for file in [SMOLLM2, QWEN] {
        let t = tokenizer(file);
        for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
            let ids = t.encode(&format!("a{special}b")).unwrap();
            let id = t
                .special_id(special)
                .unwrap_or_else(|| panic!("{file} lacks {special}"));
            assert_eq!(ids.len(), 3, "{file}: {special} split into {ids:?}");
            assert_eq!(ids[1], id);
            assert!(t.is_special(id));
        }
    }
}

#[test]
fn smollm2_template_renders_chatml_with_its_default_system_prompt() {
    let t = tokenizer(SMOLLM2);
    let tpl = template(SMOLLM2, &t);
    let text = tpl.render(&[msg("user", "Hi")]).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_renders_chatml_turns(&tpl);
    assert_eq!(tpl.end_of_turn_text().as_deref(), Some("<|im_end|>"));
}

/// A conversation with its own system prompt renders as plain ChatML turns (both default
/// models use ChatML).
fn assert_renders_chatml_turns(tpl: &ChatTemplate) {
    let multi = tpl
        .render(&[
            msg("system", "Be terse."),
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("user", "Bye"),
        ])
        .unwrap();
    assert_eq!(
        multi,
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn qwen_template_renders_its_default_system_prompt_and_turns() {
    let t = tokenizer(QWEN);
    let tpl = template(QWEN, &t);
    let text = tpl.render(&[msg("user", "Hi")]).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"), "{text}");
    assert!(
        text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    assert_renders_chatml_turns(&tpl);
}

#[test]
fn qwen_prompt_token_count_matches_llama_cpp() {
    let mut config = common::config_for(QWEN);
    config.student.context_length = 64;
    let model = LoadedModel::load(&config.student, u64::MAX).unwrap();
    let conversation = Prompt::Chat(vec![msg("user", "What is the capital of France?")]);
    let (ids, truncated) = model.prompt_tokens(&conversation, None, 64).unwrap();
    assert_eq!(ids.len(), 36);
    assert!(!truncated);
    let im_end = model.tokenizer.special_id("<|im_end|>").unwrap();
    assert!(
        model.end_tokens.contains(&im_end),
        "<|im_end|> must end the assistant's turn"
    );
}
