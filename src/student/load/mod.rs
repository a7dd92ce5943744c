//! Loading the student: everything it needs — transformer, tokenizer, chat template,
//! end-of-turn tokens — read from one GGUF after checking that it fits the memory budget
//! (a transformers checkpoint is first quantized into one by `student::checkpoint`).
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
use std::path::Path;

use footprint::Footprint;
use gguf::GgufHeader;

use crate::backend::{Prompt, SamplingDefaults, ToolUse};
use crate::config::StudentConfig;
use crate::error::DuetError;
use crate::student::grammar::Grammars;
use crate::student::model::{MAX_PREFILL_ROWS, ModelShape, Transformer};
use crate::student::text::fim::{DeclaredFim, FimTokens};
use crate::student::text::template::ChatTemplate;
use crate::student::text::tokenizer::StudentTokenizer;

/// Used when a GGUF carries no chat template: ChatML, what most small chat models use.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A loaded model, shared by all its sequences.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: StudentTokenizer,
    pub template: ChatTemplate,
    /// Tokens that end a completion: EOS, end-of-text, the template's end-of-turn marker
    /// and every FIM token (a fill-in-the-middle completion ends where the middle does).
    pub end_tokens: HashSet<u32>,
    /// The model's fill-in-the-middle tokens, when it has them.
    pub fim: Option<FimTokens>,
    /// Sampling for what a request leaves out.
    pub sampling: SamplingDefaults,
    /// The estimate made from the header before loading.
    pub footprint: Footprint,
    /// Compiles the grammars requests hold their output to.
    pub grammars: Grammars,
}

impl LoadedModel {
    /// Reads the model named by `config.model` (fetching it first if it is a hub
    /// reference), refusing it before any weight is read if it cannot fit `budget`.
    pub fn load(config: &StudentConfig, budget: u64) -> Result<Self, DuetError> {
        let path = if crate::student::checkpoint::is_checkpoint(&config.model) {
            let gguf = crate::student::checkpoint::prepare(config, budget)?;
            crate::memory::release_free_memory();
            gguf
        } else {
            fetch::resolve(&config.model)?
        };
        let mut header = GgufHeader::read(&path)?;
        let (shape, context, footprint) = fitting(&header, config, budget)?;
        let tokenizer = vocabulary::load_tokenizer(&path, &header)?;
        let declared = ["pre", "suf", "mid", "pad", "rep", "sep"].map(|name| {
            gguf::opt_u32(
                header.metadata(),
                &format!("tokenizer.ggml.fim_{name}_token_id"),
            )
        });
        let fim = FimTokens::find(DeclaredFim { ids: declared }, &tokenizer);
        let sampling = config
            .sampling
            .over(recommended_sampling(header.metadata()));
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
        end_tokens.extend(tokenizer.special_id("<|endoftext|>"));
        end_tokens.extend(fim.iter().flat_map(FimTokens::all));
        let model = tensors::read_transformer(&path, &header, shape, context)?;
        Ok(Self {
            model,
            tokenizer,
            template,
            grammars: Grammars::new(end_tokens.iter().copied()),
            end_tokens,
            fim,
            sampling,
            footprint,
        })
    }

    /// The token ids the model reads for `prompt` (with `tools` offered), in at most `budget` tokens where the
    /// prompt can be cut to fit (fill-in-the-middle: far from the cursor first); says
    /// whether it was cut. Other prompts are never cut: the caller refuses one too long.
    pub fn prompt_tokens(
        &self,
        prompt: &Prompt,
        tools: Option<&ToolUse>,
        budget: usize,
    ) -> Result<(Vec<u32>, bool), DuetError> {
        let whole = |tokens| Ok((tokens, false));
        match prompt {
            Prompt::Chat(messages) => {
                let text = match tools {
                    Some(tools) => self.template.render_with_tools(messages, &tools.tools)?,
                    None => self.template.render(messages)?,
                };
                whole(self.tokenizer.encode(&text)?)
            }
            Prompt::Text(text) => whole(self.tokenizer.encode(text)?),
            Prompt::Tokens(ids) => {
                let vocab = self.model.shape.vocab;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(DuetError::invalid(
                        "prompt",
                        format!("token id {bad} is not in this model's vocabulary of {vocab}"),
                    ));
                }
                whole(ids.clone())
            }
            Prompt::Infill(infill) => {
                let fim = self.fim.ok_or_else(|| {
                    DuetError::unsupported(
                        "suffix",
                        "this model has no fill-in-the-middle tokens, so it cannot complete \
                         between a prefix and a suffix; use a code model such as Qwen2.5-Coder",
                    )
                })?;
                fim.layout(infill, &self.tokenizer, budget)
            }
        }
    }
}

/// Checks that the GGUF whose header is at `path` (its weights may not be written yet) fits
/// `budget` when served with `config`, before any weight is read.
pub fn check_fits(path: &Path, config: &StudentConfig, budget: u64) -> Result<(), DuetError> {
    fitting(&GgufHeader::read(path)?, config, budget).map(drop)
}

/// The model's shape, the context it will serve and its footprint, if that fits `budget`.
fn fitting(
    header: &GgufHeader,
    config: &StudentConfig,
    budget: u64,
) -> Result<(ModelShape, usize, Footprint), DuetError> {
    let shape = tensors::read_shape(header)?;
    let context = config.context_length.min(shape.trained_context);
    let footprint = Footprint::estimate(header, &shape, context, MAX_PREFILL_ROWS, config.parallel);
    footprint.check(budget)?;
    Ok((shape, context, footprint))
}

/// The sampling a GGUF recommends (`general.sampling.*`, written by converters from the
/// model's generation config), llama.cpp's defaults for what it leaves out.
fn recommended_sampling(md: &std::collections::HashMap<String, gguf::Value>) -> SamplingDefaults {
    let defaults = SamplingDefaults::default();
    // A value outside its range is ignored (with a warning): the file is not the server's.
    let float = |key: &str, low: f32, high: f32, default: f32| match gguf::opt_f32(md, key) {
        Some(v) if (low..=high).contains(&v) => v,
        Some(v) => {
            tracing::warn!(
                key,
                value = v,
                "ignoring the GGUF's out-of-range sampling value"
            );
            default
        }
        None => default,
    };
    SamplingDefaults {
        temperature: float("general.sampling.temp", 0.0, 2.0, defaults.temperature),
        top_k: gguf::opt_u32(md, "general.sampling.top_k").map_or(defaults.top_k, |k| k as usize),
        top_p: float(
            "general.sampling.top_p",
            f32::MIN_POSITIVE,
            1.0,
            defaults.top_p,
        ),
        min_p: float("general.sampling.min_p", 0.0, 1.0, defaults.min_p),
    }
}
