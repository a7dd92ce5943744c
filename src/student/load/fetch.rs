//! Where the student's weights come from: a local GGUF path, or a Hugging Face
//! `owner/repo/file.gguf` fetched once into the hub cache with a progress bar.

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
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .map_err(|e| DuetError::ModelLoad(format!("Hugging Face hub client: {e}")))?;
    api.model(repo.clone())
        .get(&file)
        .map_err(|e| DuetError::ModelLoad(format!("cannot fetch {file} from {repo}: {e}")))
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
