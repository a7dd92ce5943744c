//! Where the student's weights come from: a local GGUF path, or a Hugging Face
//! `owner/repo/file.gguf` fetched once into the user's hub cache with a progress bar; and the
//! hub cache and client every hub reference goes through.

use std::path::{Path, PathBuf};

use crate::error::DuetError;

/// `owner/repo/file.gguf` split into repository and file, when `model` has that shape.
pub fn hub_reference(model: &str) -> Option<(String, String)> {
    if model.starts_with(['.', '/']) || !model.ends_with(".gguf") {
        return None;
    }
    let mut parts = model.splitn(3, '/');
    let (owner, repo, file) = (parts.next()?, parts.next()?, parts.next()?);
    (!owner.is_empty() && !repo.is_empty() && !file.is_empty())
        .then(|| (format!("{owner}/{repo}"), file.to_string()))
}

/// A local file for `model`, downloading it from the hub when it is a hub reference.
pub fn resolve(model: &str) -> Result<PathBuf, DuetError> {
    let local = Path::new(model);
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    let Some((repo, file)) = hub_reference(model) else {
        return Err(DuetError::ModelLoad(format!(
            "model file `{model}` does not exist"
        )));
    };
    tracing::info!(%repo, %file, "fetching the model from the Hugging Face hub");
    hub_client(hub_cache())?
        .model(repo.clone())
        .get(&file)
        .map_err(|e| DuetError::ModelLoad(format!("cannot fetch {file} from {repo}: {e}")))
}

/// The user's Hugging Face cache, where transformers and huggingface_hub put it:
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> hf_hub::Cache {
    std::env::var_os("HF_HUB_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(hf_hub::Cache::from_env, |dir| {
            hf_hub::Cache::new(dir.into())
        })
}

/// A hub client that downloads into `cache` (with a progress bar), from `HF_ENDPOINT` when set.
pub fn hub_client(cache: hf_hub::Cache) -> Result<hf_hub::api::sync::Api, DuetError> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint);
    }
    builder
        .build()
        .map_err(|e| DuetError::ModelLoad(format!("Hugging Face hub client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_references_need_owner_repo_and_a_gguf_file() {
        assert_eq!(
            hub_reference("bartowski/SmolLM2-GGUF/sub/model.gguf"),
            Some(("bartowski/SmolLM2-GGUF".into(), "sub/model.gguf".into()))
        );
        assert_eq!(hub_reference("models/x.gguf"), None);
        assert_eq!(hub_reference("./a/b/c.gguf"), None);
        assert_eq!(hub_reference("a/b/c.bin"), None);
    }
}
