//! The forward pass of a decoder-only transformer (`llama`, `qwen2`) on plain f32 rows:
//! [`shape`] (hyper-parameters and the memory they imply), [`transformer`] (the pass over a
//! batch of sequences), [`attention`], [`ops`] (norms, activations, rotary embeddings) and
//! [`weights`] (matrices kept in their GGUF block format). Nothing here reads files: `load`
//! builds the model.

pub mod attention;
pub mod ops;
pub mod shape;
pub mod transformer;
pub mod weights;

pub use shape::{Architecture, ModelShape};
pub use transformer::{Step, Transformer};

/// Most prompt tokens one forward pass reads: the activation buffers are sized for it, it
/// bounds the attention scores' memory for long prompts, and how long one pass delays the
/// sequences decoding beside it.
pub const MAX_PREFILL_ROWS: usize = 256;
