//! Text in and out of the model: the [`tokenizer`] built from the GGUF's vocabulary, the
//! [`template`] that renders a conversation as the model was trained to read it, the
//! [`detokenizer`] that never splits a UTF-8 character, and [`stop`] strings held back until
//! they can no longer match.

pub mod detokenizer;
pub mod fim;
pub mod middle;
pub mod stop;
pub mod template;
pub mod tokenizer;
