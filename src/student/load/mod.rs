//! Loading the student: everything it needs — transformer, tokenizer, chat template,
//! end-of-turn tokens — read from one GGUF after checking that it fits the memory budget.
//!
//! - [`fetch`]: where the file is (a path, or a Hugging Face reference fetched once);
//! - [`gguf`]: the file's header and metadata;
//! - [`footprint`]: what the model will cost in memory, before any weight is read;
//! - [`tensors`]: the model's shape and weights;
//! - [`vocabulary`]: the tokenizer.

pub mod fetch;
pub mod footprint;
pub mod gguf;
pub mod tensors;
pub mod vocabulary;

use std::collections::HashSet;

use footprint::Footprint;
use gguf::GgufHeader;

use crate::backend::ChatMessage;
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::student::model::{MAX_PREFILL_ROWS, Transformer};
use crate::student::text::template::ChatTemplate;
use crate::student::text::tokenizer::StudentTokenizer;

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
        let path = fetch::resolve(&config.model)?;
        let mut header = GgufHeader::read(&path)?;
        let shape = tensors::read_shape(&header)?;
        let context = config.context_length.min(shape.trained_context);
        let footprint =
            Footprint::estimate(&header, &shape, context, MAX_PREFILL_ROWS, config.parallel);
        footprint.check(budget)?;
        let tokenizer = vocabulary::load_tokenizer(&path, &header)?;
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
        let model = tensors::read_transformer(&path, &header, shape, context)?;
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
