//! Key/value caches: one per sequence ([`kv`]), and the prefix cache ([`prefix`]) that keeps
//! finished sequences' caches so that a conversation's next turn reads only its new tokens.

pub mod kv;
pub mod prefix;
