//! The forward pass of a decoder-only transformer (`llama`, `qwen2`) on plain f32 rows:
//! [`shape`] (hyper-parameters and the memory they imply), [`transformer`] (the pass over a
//! batch of sequences), [`attention`], [`ops`] (norms, activations, rotary embeddings) and
//! [`weights`] (matrices kept in their GGUF block format). `load` builds the model from a
//! GGUF file; here only the weights read their own bytes.

pub mod attention;
pub mod ops;
pub mod shape;
pub mod transformer;
pub mod weights;

pub use shape::{Architecture, ModelShape};
pub use transformer::{Step, Transformer};

/// Most prompt tokens one forward pass reads: the footprint estimate counts activation
/// buffers for it, and it bounds how long one pass delays the sequences decoding beside it.
pub const MAX_PREFILL_ROWS: usize = 256;
