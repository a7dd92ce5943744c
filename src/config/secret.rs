//! [`Secret`]: a setting that must never be printed (client API keys). `Debug` and
//! `Display` show `***`, and so does serializing it (no printed configuration can show
//! one); only [`Secret::expose`] reads the value. It is read from the plain string the file
//! or environment holds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string. Comparing two with `==` is not constant time: it is for settings;
/// checking what a client sent goes through `http::auth`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // An unset secret has nothing to hide, and must read back as unset.
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

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
    fn prints_and_serializes_as_stars_and_reads_the_plain_string() {
        let key = Secret::from("sk-123");
        assert_eq!(
            format!("{key:?} {key} {:?}", vec![key.clone()]),
            "*** *** [***]"
        );
        assert_eq!(key.expose(), "sk-123");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"***\"");
        assert_eq!(serde_json::from_str::<Secret>("\"sk-123\"").unwrap(), key);
    }
}
