//! Fill-in-the-middle prompts: the model's FIM tokens (from the GGUF's
//! `tokenizer.ggml.fim_*_token_id` keys, else the token texts llama.cpp recognises) and the
//! prompt they make from the code around the cursor, laid out as llama.cpp's server does:
//! other files first (repo-style when the model has repository and file-separator tokens),
//! then `<prefix>` code before the cursor `<suffix>` code after it `<middle>`.

use super::tokenizer::StudentTokenizer;
use crate::backend::Infill;
use crate::error::DuetError;

/// A model's FIM tokens; the first three are what FIM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
    pub pad: Option<u32>,
    /// Starts a repository's name (`<|repo_name|>`).
    pub repo: Option<u32>,
    /// Starts a file (`<|file_sep|>`).
    pub file_separator: Option<u32>,
}

/// Token texts of the FIM families llama.cpp knows, when the GGUF does not name the ids:
/// prefix, suffix, middle, pad, repository, file separator.
const FAMILIES: [[&str; 6]; 4] = [
    // Qwen2.5-Coder and others
    [
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ],
    // StarCoder
    [
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        "<fim_pad>",
        "<repo_name>",
        "<file_sep>",
    ],
    // CodeLlama
    ["<PRE>", "<SUF>", "<MID>", "", "", ""],
    // DeepSeek-Coder
    [
        "<｜fim▁begin｜>",
        "<｜fim▁hole｜>",
        "<｜fim▁end｜>",
        "",
        "",
        "",
    ],
];

/// The ids a GGUF names for FIM (`tokenizer.ggml.fim_{pre,suf,mid,pad,rep,sep}_token_id`).
#[derive(Debug, Default, Clone, Copy)]
pub struct DeclaredFim {
    pub ids: [Option<u32>; 6],
}

impl FimTokens {
    /// The model's FIM tokens: as the GGUF declares them, else found by their texts.
    pub fn find(declared: DeclaredFim, tokenizer: &StudentTokenizer) -> Option<Self> {
        let from = |ids: [Option<u32>; 6]| {
            Some(Self {
                prefix: ids[0]?,
                suffix: ids[1]?,
                middle: ids[2]?,
                pad: ids[3],
                repo: ids[4],
                file_separator: ids[5],
            })
        };
        from(declared.ids).or_else(|| {
            FAMILIES.iter().find_map(|family| {
                from(family.map(|text| {
                    (!text.is_empty())
                        .then(|| tokenizer.special_id(text))
                        .flatten()
                }))
            })
        })
    }

    /// Every FIM token: generating one ends a completion (the middle is done).
    pub fn all(&self) -> impl Iterator<Item = u32> {
        [self.prefix, self.suffix, self.middle]
            .into_iter()
            .chain(self.pad)
            .chain(self.repo)
            .chain(self.file_separator)
    }

    /// The prompt for `infill` in at most `budget` tokens: the code nearest the cursor is
    /// kept (a quarter of the budget after it, the rest before), other files get up to a
    /// quarter, their newest part. That quarter does not depend on how much code surrounds
    /// the cursor, so a keystroke does not move the cut and the prompt cache still matches.
    /// Says whether anything was cut.
    pub fn layout(
        &self,
        infill: &Infill,
        tokenizer: &StudentTokenizer,
        budget: usize,
    ) -> Result<(Vec<u32>, bool), DuetError> {
        // Special tokens written in the code are matched whole, as in a raw prompt.
        let encode = |text: &str| tokenizer.encode(text);
        let mut extra = Vec::new();
        if !infill.extra.is_empty() {
            if let (Some(repo), Some(_)) = (self.repo, self.file_separator) {
                extra.push(repo);
                extra.extend(encode("myproject\n")?);
            }
            for file in &infill.extra {
                match self.file_separator {
                    Some(separator) => {
                        extra.push(separator);
                        extra.extend(encode(&format!("{}\n", file.filename))?);
                    }
                    None => extra.extend(encode("\n\n--- snippet ---\n\n")?),
                }
                extra.extend(encode(&file.text)?);
            }
            if let Some(separator) = self.file_separator {
                extra.push(separator);
                extra.extend(encode("filename\n")?);
            }
        }
        let mut prefix = encode(&infill.prefix)?;
        prefix.extend(encode(&infill.prompt)?);
        let mut suffix = encode(&infill.suffix)?;
        let room = budget.saturating_sub(3); // the three FIM tokens
        let extra_take = extra.len().min(room / 4);
        let suffix_take = suffix.len().min(room / 4);
        let prefix_take = prefix.len().min(room - extra_take - suffix_take);
        let truncated =
            suffix_take < suffix.len() || prefix_take < prefix.len() || extra_take < extra.len();
        suffix.truncate(suffix_take);
        let mut tokens = Vec::with_capacity(budget.min(extra_take + prefix_take + suffix_take + 3));
        tokens.extend_from_slice(&extra[extra.len() - extra_take..]);
        tokens.push(self.prefix);
        tokens.extend_from_slice(&prefix[prefix.len() - prefix_take..]);
        tokens.push(self.suffix);
        tokens.extend_from_slice(&suffix);
        tokens.push(self.middle);
        Ok((tokens, truncated))
    }
}
