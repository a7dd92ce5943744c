//! Where a transformers checkpoint is: a local directory, or a Hugging Face `owner/repo` id
//! resolved through the user's Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`),
//! downloading with a progress bar only the files the cache lacks.

use std::path::{Path, PathBuf};

use crate::error::DuetError;

/// `owner/repo` when `model` has that shape (and is not a path).
pub fn repo_id(model: &str) -> Option<&str> {
    if model.starts_with(['.', '/', '~']) || model.ends_with(".gguf") {
        return None;
    }
    let mut parts = model.split('/');
    let (owner, repo) = (parts.next()?, parts.next()?);
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    (parts.next().is_none() && plain(owner) && plain(repo)).then_some(model)
}

/// The local directory holding the checkpoint `model` names.
pub fn resolve(model: &str) -> Result<PathBuf, DuetError> {
    let local = Path::new(model);
    if local.is_dir() {
        if !local.join("config.json").is_file() {
            return Err(DuetError::ModelLoad(format!(
                "{} has no config.json: not a transformers checkpoint",
                local.display()
            )));
        }
        return Ok(local.to_path_buf());
    }
    let repo = repo_id(model).ok_or_else(|| {
        DuetError::ModelLoad(format!(
            "`{model}` is neither a checkpoint directory nor an owner/repo id"
        ))
    })?;
    from_hub(repo, crate::student::load::fetch::hub_cache())
}

/// The snapshot directory of `repo` in the hub cache, with every file loading needs.
fn from_hub(repo: &str, hub: hf_hub::Cache) -> Result<PathBuf, DuetError> {
    let cache = hub.model(repo.to_string());
    let mut api = None;
    // A file from the cache, else downloaded (the client is built on first need, so a
    // fully cached checkpoint never touches the network).
    let mut get = |file: &str| -> Result<PathBuf, String> {
        if let Some(path) = cache.get(file) {
            return Ok(path);
        }
        if api.is_none() {
            tracing::info!(%repo, "fetching the checkpoint from the Hugging Face hub");
            let client =
                crate::student::load::fetch::hub_client(hub.clone()).map_err(|e| e.to_string())?;
            api = Some(client.model(repo.to_string()));
        }
        let repo_api = api.as_ref().expect("built above");
        repo_api.get(file).map_err(|e| format!("{e}"))
    };
    let fail = |file: &str, e: String| {
        DuetError::ModelLoad(format!(
            "cannot fetch {file} from the Hugging Face repo {repo} (and no directory `{repo}` exists): {e}"
        ))
    };
    let downloading = ["config.json", "tokenizer.json"]
        .iter()
        .any(|f| cache.get(f).is_none());
    let config = get("config.json").map_err(|e| fail("config.json", e))?;
    let shards = if let Some(index) = cache.get("model.safetensors.index.json") {
        super::shards::index_files(&index)?
    } else if cache.get("model.safetensors").is_some() {
        vec!["model.safetensors".to_string()]
    } else {
        match get("model.safetensors.index.json") {
            Ok(index) => super::shards::index_files(&index)?,
            Err(_) => vec!["model.safetensors".to_string()],
        }
    };
    let mut files = vec![config.clone()];
    for shard in &shards {
        files.push(get(shard).map_err(|e| fail(shard, e))?);
    }
    files.push(get("tokenizer.json").map_err(|e| fail("tokenizer.json", e))?);
    // Optional (the template may live in either file; generation defaults may be absent):
    // fetched only alongside a download, so a cached checkpoint starts offline.
    for optional in [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if let Some(path) = cache.get(optional) {
            files.push(path);
        } else if downloading && let Ok(path) = get(optional) {
            files.push(path);
        }
    }
    // Every file must be in one snapshot: a download that moved `refs/main` to a new
    // revision would otherwise mix two.
    let snapshot = config
        .parent()
        .expect("a cached file lies in its snapshot directory");
    if let Some(stray) = files.iter().find(|f| f.parent() != Some(snapshot)) {
        return Err(DuetError::ModelLoad(format!(
            "the Hugging Face cache of {repo} mixes revisions ({} is not in {}); fetch the repo again",
            stray.display(),
            snapshot.display()
        )));
    }
    Ok(snapshot.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert_eq!(
            repo_id("Qwen/Qwen1.5-1.8B-Chat"),
            Some("Qwen/Qwen1.5-1.8B-Chat")
        );
        for not in [
            "models/x.gguf",
            "./a/b",
            "/abs/dir",
            "a/b/c",
            "a",
            "owner/",
            "a b/c",
        ] {
            assert_eq!(repo_id(not), None, "{not}");
        }
    }

    #[test]
    fn a_cached_checkpoint_resolves_without_network() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--owner--tiny");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        // Every file loading asks for is cached, so no client is built: no network.
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            std::fs::write(snapshot.join(file), "{}").unwrap();
        }
        let cache = hf_hub::Cache::new(home.path().join("hub"));
        assert_eq!(from_hub("owner/tiny", cache).unwrap(), snapshot);
    }
}
