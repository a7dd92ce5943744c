//! Output held to a grammar while it is sampled (OpenAI's `response_format` with a JSON
//! schema, tool calls), with llguidance: the engine behind llama.cpp's and mistral.rs's
//! grammars.
//!
//! [`vocabulary`] gives llguidance each token's bytes (special tokens marked, so no text can
//! spell them); [`Grammars`] builds its parser factory once per model, on the first request
//! that needs it (a few megabytes a model without such requests never pays); [`Guide`]
//! follows one sequence: the sampler draws first and the guide only checks the token,
//! computing the full mask over the vocabulary when the token is refused, as mistral.rs does.

mod guide;
pub mod tools;
mod vocabulary;

use std::sync::{Arc, OnceLock};

use llguidance::ParserFactory;
use llguidance::api::TopLevelGrammar;

pub use guide::Guide;

use crate::error::DuetError;
use crate::student::text::tokenizer::StudentTokenizer;

/// Blank space the JSON a model writes may hold between tokens (llguidance matches it at
/// most once per gap): a space, or a line break and an indent, as one-line and pretty-printed
/// JSON have. Left free, a small model at temperature 1 writes line breaks until its tokens
/// run out.
const WHITESPACE: &str = r"\x20|\n\x20{0,12}";

/// A model's grammar compiler, built on first use.
pub struct Grammars {
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    /// The tokens that end the model's turn, in order.
    end_tokens: Vec<u32>,
}

impl Grammars {
    /// The compiler for a model whose turn ends with any of `end_tokens`.
    pub fn new(end_tokens: impl IntoIterator<Item = u32>) -> Self {
        let mut end_tokens: Vec<u32> = end_tokens.into_iter().collect();
        end_tokens.sort_unstable();
        Self {
            factory: OnceLock::new(),
            end_tokens,
        }
    }

    /// A guide for `grammar`, or a 400 naming `param` with the compiler's reason.
    pub fn guide(
        &self,
        tokenizer: &StudentTokenizer,
        vocab: usize,
        grammar: TopLevelGrammar,
        param: &str,
    ) -> Result<Guide, DuetError> {
        let factory = self
            .factory
            .get_or_init(|| build_factory(tokenizer, vocab, &self.end_tokens))
            .as_ref()
            .map_err(|e| DuetError::Internal(format!("grammar support: {e}")))?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| DuetError::invalid(param, format!("cannot be followed: {e:#}")))?;
        Ok(Guide::new(parser, &self.end_tokens))
    }
}

fn build_factory(
    tokenizer: &StudentTokenizer,
    vocab: usize,
    end_tokens: &[u32],
) -> Result<Arc<ParserFactory>, String> {
    let env = vocabulary::token_env(tokenizer, vocab, end_tokens);
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{e:#}"))?;
    // Warnings on stderr and parser dumps in errors are for llguidance's developers.
    factory.quiet();
    factory.limits_mut().verbose_errors = false;
    Ok(Arc::new(factory))
}

/// The grammar of JSON following `schema`, with bounded blank space unless the schema
/// sets its own (`x-guidance`).
pub fn json_schema(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let serde_json::Value::Object(map) = &mut schema {
        map.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({ "whitespace_pattern": WHITESPACE }));
    }
    TopLevelGrammar::from_json_schema(schema)
}
