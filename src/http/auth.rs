//! Client authentication: when `server.api_keys` (or `server.api_keys_file`) holds keys,
//! every endpoint but `/health` and the chat page (`/` and its assets) wants
//! `Authorization: Bearer <key>`, compared in constant time; a missing or wrong key is a 401
//! with an OpenAI error body. Keys never reach logs.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{AUTHORIZATION, HeaderMap};
use actix_web::middleware::Next;
use actix_web::{ResponseError, web};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::ServerConfig;
use crate::error::DuetError;

/// The keys clients may present.
#[derive(Default)]
pub struct ClientKeys {
    keys: Vec<Vec<u8>>,
}

impl ClientKeys {
    /// Keys from `server.api_keys` and from `server.api_keys_file` (one per line; blank
    /// lines and `#` comments ignored).
    pub fn load(config: &ServerConfig) -> Result<Self, String> {
        let mut keys: Vec<Vec<u8>> = config
            .api_keys
            .iter()
            .map(|k| k.expose().trim().as_bytes().to_vec())
            .collect();
        if !config.api_keys_file.is_empty() {
            let text = std::fs::read_to_string(&config.api_keys_file).map_err(|e| {
                format!(
                    "server.api_keys_file: cannot read {}: {e}",
                    config.api_keys_file
                )
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        keys.retain(|k| !k.is_empty());
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `token` is one of the keys; every key is compared, in constant time.
    pub fn accepts(&self, token: &[u8]) -> bool {
        let mut found = subtle::Choice::from(0);
        for key in &self.keys {
            found |= key.as_slice().ct_eq(token);
        }
        found.into()
    }
}

/// The middleware: lets `/health` and the chat page through, checks the bearer key
/// everywhere else.
pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let keys = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.client_keys.clone());
    let open = matches!(req.path(), "/health" | "/ready")
        || super::page::OPEN_PATHS.contains(&req.path())
        || keys.as_ref().is_none_or(|k| k.is_empty());
    if open {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    }
    let token = bearer_token(req.headers());
    let accepted = match (token, &keys) {
        (Some(token), Some(keys)) => keys.accepts(token.as_bytes()),
        _ => false,
    };
    if accepted {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    }
    let error = if token.is_some() {
        DuetError::Unauthorized(WRONG)
    } else {
        DuetError::Unauthorized(MISSING)
    };
    Ok(req.into_response(error.error_response()))
}

/// The token of `Authorization: Bearer <token>`, when present.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

const MISSING: &str =
    "this duet wants an API key: send it as `Authorization: Bearer <key>` (the SDKs' api_key)";
const WRONG: &str = "the API key is not one this duet accepts";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_settings_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team keys\nkey-from-file\n\n").unwrap();
        let config = ServerConfig {
            api_keys: vec!["key-one".into()],
            api_keys_file: file.display().to_string(),
            ..ServerConfig::default()
        };
        let keys = ClientKeys::load(&config).unwrap();
        assert!(keys.accepts(b"key-one") && keys.accepts(b"key-from-file"));
        assert!(!keys.accepts(b"key-on") && !keys.accepts(b"") && !keys.accepts(b"key-one "));
    }
}
