//! Everything loaded for the student — transformer, tokenizer, chat template, end-of-turn
//! tokens — read from one GGUF after checking that it fits the memory budget.

use std::collections::HashSet;

use super::footprint::Footprint;
use super::gguf::{self, GgufHeader};
use super::model::{ModelShape, Transformer};
use super::source;
use super::template::ChatTemplate;
use super::tokenizer::StudentTokenizer;
use crate::backend::ChatMessage;
use crate::config::StudentConfig;
use crate::error::DuetError;

/// Used when a GGUF carries no chat template: ChatML, what most small chat models use.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A loaded model, shared by all its sequences.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: StudentTokenizer,
    pub template: ChatTemplate,
    /// Tokens that end the assistant's turn (EOS and the template's end-of-turn marker).
    pub end_tokens: HashSet<u32>,
    /// The estimate made from the header before loading.
    pub footprint: Footprint,
}

impl LoadedModel {
    /// Reads the model named by `config.model` (fetching it first if it is a hub
    /// reference), refusing it before any weight is read if it cannot fit `budget`.
    pub fn load(config: &StudentConfig, budget: u64) -> Result<Self, DuetError> {
        let path = source::resolve(&config.model)?;
        let mut header = GgufHeader::read(&path)?;
        let shape = ModelShape::from_header(&header)?;
        let context = config.context_length.min(shape.trained_context);
        let footprint = Footprint::estimate(&header, &shape, context, config.parallel);
        footprint.check(budget)?;
        let tokenizer = StudentTokenizer::load(&path, &header)?;
        // The parsed vocabulary and merges are hundreds of thousands of small strings the
        // tokenizer now holds its own copy of: free them before the weights arrive.
        header.drop_tokenizer_metadata();
        crate::memory::release_free_memory();
        let template_source = gguf::string(header.metadata(), "tokenizer.chat_template")
            .unwrap_or_else(|_| {
                tracing::warn!("the GGUF has no chat template; using ChatML");
                CHATML.to_string()
            });
        let text_of = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            &template_source,
            text_of(tokenizer.bos),
            text_of(tokenizer.eos),
        )?;
        let mut end_tokens: HashSet<u32> = tokenizer.eos.into_iter().collect();
        end_tokens.extend(gguf::opt_u32(
            header.metadata(),
            "tokenizer.ggml.eot_token_id",
        ));
        if let Some(id) = template
            .end_of_turn_text()
            .and_then(|t| tokenizer.special_id(&t))
        {
            end_tokens.insert(id);
        }
        let model = Transformer::load(&path, &header, shape, context)?;
        Ok(Self {
            model,
            tokenizer,
            template,
            end_tokens,
            footprint,
        })
    }

    /// The prompt's token ids for a conversation, as the model's template renders it.
    pub fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, DuetError> {
        self.tokenizer.encode(&self.template.render(messages)?)
    }
}
