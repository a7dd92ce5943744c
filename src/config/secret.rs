//! [`Secret`]: a setting that must never be printed (client API keys). `Debug` and
//! `Display` show `***`; only [`Secret::expose`] reads the value, and serde reads and
//! writes it as the plain string the file or environment holds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string. Comparing two with `==` is not constant time: it is for settings;
/// checking what a client sent goes through `http::auth`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the code that has to use it (never for logs).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_stars_and_serializes_as_the_plain_string() {
        let key = Secret::from("sk-123");
        assert_eq!(
            format!("{key:?} {key} {:?}", vec![key.clone()]),
            "*** *** [***]"
        );
        assert_eq!(key.expose(), "sk-123");
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, "\"sk-123\"");
        assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), key);
    }
}
