//! The local student model: loaded lazily, exactly once, on its own engine thread, and
//! served through the [`ChatBackend`](crate::backend::ChatBackend) trait.
//!
//! - [`handle`]: the [`Student`] the HTTP edge holds (admission, the job queue);
//! - [`engine`]: the engine thread (its loop, the scheduler that plans each forward pass, one
//!   request's sequence, the sampler);
//! - [`load`]: reading a model (GGUF header, fetching from the hub, the memory footprint);
//! - [`checkpoint`]: transformers checkpoints (and LoRA adapters) quantized into a GGUF;
//! - [`model`]: the forward pass (shape, transformer, attention, ops, quantized weights);
//! - [`kernels`]: duet's own quantized matrix products, per block format and instruction set;
//! - [`cache`]: key/value caches, and the prefix cache that keeps them across requests;
//! - [`text`]: tokenizer, chat template, detokenizer, stop strings.
//!
//! What it reports in `/health` and `/metrics` is [`StudentStatus`].

pub mod cache;
pub mod checkpoint;
pub mod engine;
pub mod grammar;
pub mod handle;
pub mod kernels;
pub mod load;
pub mod model;
pub mod text;

pub use crate::backend::{LoadState, StudentStatus};
pub use handle::Student;
