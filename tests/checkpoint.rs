//! Transformers checkpoints as the student, as the Python app's users have them: made by the
//! suite from the test GGUFs (dequantized, f16 safetensors in shards, llama's query/key rows in
//! transformers' order, tokenizer and config files), started with the app's own `.env`
//! variables, quantized while loading. Answers are checked against the GGUF they came from,
//! a LoRA adapter against the same weights merged by hand, memory against the file written.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use common::checkpoint::{Weight, make_checkpoint, make_lora, write_merged};
use common::{Process, QWEN, SMOLLM2, model_path, start_duet};
use duet::student::load::gguf::GgufHeader;
use safetensors::Dtype;

/// Short chat prompts whose greedy answers are compared.
const PROMPTS: [&str; 6] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion in one sentence.",
    "Write a Python function that reverses a string.",
    "What is 12 times 7?",
];

/// Tokens compared per answer.
const TOKENS: u32 = 8;

/// SmolLM2 as a checkpoint, an adapter for it, the two merged by hand, and one cache
/// directory every server of this file shares (as one user's machine would).
struct Fixture {
    _root: tempfile::TempDir,
    checkpoint: PathBuf,
    lora: PathBuf,
    merged: PathBuf,
    cache: PathBuf,
}

fn smollm2_checkpoint() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("SmolLM2-135M-Instruct");
        let weights: HashMap<String, Weight> =
            make_checkpoint(&model_path(SMOLLM2), &checkpoint, Dtype::F16);
        let lora = root.path().join("adapter");
        let deltas = make_lora(
            &lora,
            &weights,
            &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            16.0,
        );
        let merged = root.path().join("merged");
        write_merged(&merged, &checkpoint, &weights, &deltas);
        Fixture {
            checkpoint,
            lora,
            merged,
            cache: root.path().join("cache"),
            _root: root,
        }
    })
}

/// `duet serve` on `model` with the Python app's variables in `env`.
fn serve(model: &Path, cache: &Path, env: &[(&str, &str)]) -> (Process, String) {
    let model = model.display().to_string();
    let cache = cache.display().to_string();
    let mut all = vec![
        ("STUDENT_BASE_MODEL", model.as_str()),
        ("XDG_CACHE_HOME", cache.as_str()),
    ];
    all.extend_from_slice(env);
    start_duet(&[], &all)
}

/// The model id the server at `base` lists.
async fn served_model(base: &str) -> String {
    let models: serde_json::Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    models["data"][0]["id"].as_str().unwrap().to_string()
}

/// The greedy first tokens of each prompt's answer.
async fn answers(base: &str) -> Vec<String> {
    let model = served_model(base).await;
    let mut out = Vec::new();
    for prompt in PROMPTS {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": TOKENS,
        });
        let response: serde_json::Value = common::post(base, body).await.json().await.unwrap();
        let text = response["choices"][0]["message"]["content"].as_str();
        out.push(text.unwrap_or_else(|| panic!("{response}")).to_string());
    }
    out
}

/// The process's peak resident set so far (`VmHWM`), in bytes.
fn peak_rss(process: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.0.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// The GGUF files in a cache directory.
fn cached_files(cache: &Path) -> Vec<PathBuf> {
    let dir = cache.join("duet/checkpoints");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "gguf"));
    files.sort();
    files
}

/// The size `report` gives after `label` ("63.3 MiB"), in bytes.
fn mib_after(report: &str, label: &str) -> u64 {
    let rest = &report[report.find(label).unwrap_or_else(|| panic!("{report}")) + label.len()..];
    let mut words = rest.split_whitespace();
    let value: f64 = words.next().unwrap().parse().unwrap();
    let unit = match words.next().unwrap().trim_end_matches(')') {
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => panic!("unit {other}"),
    };
    (value * unit as f64) as u64
}

/// Whether a cache directory holds nothing at all: no GGUF, no partial file.
fn nothing_in(cache: &Path) -> bool {
    std::fs::read_dir(cache.join("duet/checkpoints")).map_or(true, |mut d| d.next().is_none())
}

/// How many answers agree, printing each pair.
fn agreeing(label: &str, want: &[String], got: &[String]) -> usize {
    let mut same = 0;
    for ((prompt, w), g) in PROMPTS.iter().zip(want).zip(got) {
        let ok = w == g;
        same += usize::from(ok);
        println!(
            "{label} {} {prompt:?}: want {w:?}, got {g:?}",
            if ok { "same" } else { "DIFF" }
        );
    }
    same
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_8_bit_load_answers_like_the_gguf_it_came_from() {
    let f = smollm2_checkpoint();
    let (_source_guard, source) = start_duet(
        &["--model", &model_path(SMOLLM2).display().to_string()],
        &[],
    );
    let want = answers(&source).await;

    // A cache of its own: the peak of a start that quantizes is what is measured.
    let cache = tempfile::tempdir().unwrap();
    let (server, base) = serve(
        &f.checkpoint,
        cache.path(),
        &[("STUDENT_LOAD_IN_4BIT", "0")],
    );
    let converted = cached_files(cache.path())
        .into_iter()
        .find(|p| p.to_string_lossy().contains("SmolLM2-135M-Instruct-q8_0-"))
        .expect("the conversion is cached before the server listens");
    let size = std::fs::metadata(&converted).unwrap().len();
    let quantizing_peak = peak_rss(&server);
    let got = answers(&base).await;
    let loaded_peak = peak_rss(&server);
    println!(
        "Q8_0 GGUF {} MiB; peak RSS after quantizing {} MiB, after loading {} MiB",
        size >> 20,
        quantizing_peak >> 20,
        loaded_peak >> 20
    );
    assert!(
        quantizing_peak * 2 <= size * 3,
        "quantizing peaked at {quantizing_peak} bytes, over 1.5x the {size}-byte result"
    );
    assert!(
        loaded_peak * 2 <= size * 3,
        "loading peaked at {loaded_peak} bytes, over 1.5x the {size}-byte quantized weights"
    );
    let same = agreeing("q8_0", &want, &got);
    assert!(same >= 4, "only {same} of {} answers agree", PROMPTS.len());

    let header = GgufHeader::read(&converted).unwrap();
    for (name, info) in &header.content.tensor_infos {
        let expected = if info.shape.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        };
        assert_eq!(info.ggml_dtype, expected, "{name}");
    }

    // The next start reads the cached file instead of quantizing again.
    drop(server);
    let modified = std::fs::metadata(&converted).unwrap().modified().unwrap();
    let (_again, base) = serve(
        &f.checkpoint,
        cache.path(),
        &[("STUDENT_LOAD_IN_4BIT", "0")],
    );
    assert_eq!(answers(&base).await, got);
    assert_eq!(
        std::fs::metadata(&converted).unwrap().modified().unwrap(),
        modified
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_adapter_changes_answers_as_the_merged_weights_predict() {
    let f = smollm2_checkpoint();
    let lora = f.lora.display().to_string();
    let env = [
        ("STUDENT_LOAD_IN_4BIT", "0"),
        ("STUDENT_LORA_DIR", lora.as_str()),
    ];
    let (_adapted_guard, adapted) = serve(&f.checkpoint, &f.cache, &env);
    let with_adapter = answers(&adapted).await;
    let (_merged_guard, merged) = serve(&f.merged, &f.cache, &[("STUDENT_LOAD_IN_4BIT", "0")]);
    let by_hand = answers(&merged).await;
    assert_eq!(
        agreeing("lora", &by_hand, &with_adapter),
        PROMPTS.len(),
        "merging while loading must give what the weights merged by hand give"
    );
    let (_base_guard, base) = serve(&f.checkpoint, &f.cache, &[("STUDENT_LOAD_IN_4BIT", "0")]);
    let without = answers(&base).await;
    assert!(
        agreeing("base", &without, &with_adapter) < PROMPTS.len(),
        "the adapter changes at least one answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_repo_id_is_downloaded_once_then_read_from_the_cache() {
    let f = smollm2_checkpoint();
    let hub = common::hub::FakeHub::serve(&f.checkpoint);
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().display().to_string();
    let endpoint = hub.url.clone();
    let cache = home.path().join("duet-cache");
    let env = [
        ("HF_HOME", hf_home.as_str()),
        ("HF_ENDPOINT", endpoint.as_str()),
        ("STUDENT_LOAD_IN_4BIT", "0"),
    ];
    let repo = Path::new("HuggingFaceTB/SmolLM2-135M-Instruct");
    let (first, base) = serve(repo, &cache, &env);
    let downloaded = answers(&base).await;
    assert!(hub.requests() > 0, "the files came from the hub");
    let snapshot = home
        .path()
        .join("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots")
        .join(common::hub::COMMIT);
    for file in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        assert!(
            snapshot.join(file).is_file(),
            "{file} is in the Hugging Face cache"
        );
    }
    drop(first);

    // The hub is gone: the next start reads the cache (and duet's converted file).
    drop(hub);
    let (_again, base) = serve(repo, &cache, &env);
    assert_eq!(answers(&base).await, downloaded);
    assert_eq!(served_model(&base).await, "SmolLM2-135M-Instruct");
}

#[test]
fn duet_quantize_writes_q4_k_m_in_bounded_memory() {
    let f = smollm2_checkpoint();
    let out = tempfile::tempdir().unwrap();
    let gguf = out.path().join("smollm2-q4_k_m.gguf");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["quantize", "--type", "q4_k_m"])
        .arg(&f.checkpoint)
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It reports the kernel's count of its peak (VmHWM): what the process alone held, unlike
    // wait4's, which counts this test's own pages the child shared before exec.
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let peak = mib_after(&report, "peak RSS of the process ");
    let size = std::fs::metadata(&gguf).unwrap().len();
    println!("{report}");
    assert!(
        peak * 2 <= size * 3,
        "peak RSS {peak} over 1.5x the {size}-byte file"
    );

    // llama.cpp's Q4_K_M choices; SmolLM2's 576-wide rows do not fill 256-value
    // super-blocks, so those fall back as llama.cpp's do (Q4_K to Q5_0, Q6_K to Q8_0).
    let header = GgufHeader::read(&gguf).unwrap();
    let dtype = |name: &str| header.content.tensor_infos[name].ggml_dtype;
    assert_eq!(dtype("token_embd.weight"), GgmlDType::Q8_0, "the tied head");
    assert_eq!(dtype("blk.0.attn_q.weight"), GgmlDType::Q5_0);
    assert_eq!(dtype("blk.0.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.3.ffn_down.weight"), GgmlDType::Q4K);
    assert_eq!(dtype("blk.0.attn_norm.weight"), GgmlDType::F32);
    let md = header.metadata();
    assert!(md.contains_key("tokenizer.huggingface.json"));
    assert!(md.contains_key("tokenizer.chat_template"));
    let ids = duet::student::load::vocabulary::load_tokenizer(&gguf, &header).unwrap();
    assert_eq!(ids.encode("Hello, world!").unwrap(), [19556, 28, 905, 17]);
}

#[test]
fn a_bad_adapter_stops_start_up_with_the_file_named() {
    let f = smollm2_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let start = |lora: &Path| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["serve", "--port", "0"])
            .env("STUDENT_BASE_MODEL", &f.checkpoint)
            .env("STUDENT_LORA_DIR", lora)
            .env("XDG_CACHE_HOME", dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = start(&dir.path().join("missing"));
    assert!(
        err.contains("STUDENT_LORA_DIR") && err.contains("adapter_config.json"),
        "{err}"
    );

    let unknown = dir.path().join("unknown-target");
    std::fs::create_dir_all(&unknown).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.lora.join(file), unknown.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(unknown.join("adapter_config.json")).unwrap();
    std::fs::write(
        unknown.join("adapter_config.json"),
        config.replace("\"down_proj\"", "\"embed_tokens\""),
    )
    .unwrap();
    let err = start(&unknown);
    assert!(
        err.contains("adapter_config.json") && err.contains("embed_tokens"),
        "{err}"
    );

    // An adapter made for Qwen's shapes does not fit SmolLM2.
    let other = dir.path().join("other-model");
    let rows = vec![0.0; 896 * 4];
    let weights = HashMap::from([(
        "model.layers.0.self_attn.v_proj.weight".to_string(),
        Weight {
            shape: vec![4, 896],
            values: rows,
        },
    )]);
    make_lora(&other, &weights, &["v_proj"], 8.0);
    let err = start(&other);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("v_proj"),
        "{err}"
    );
    assert!(
        cached_files(dir.path()).is_empty(),
        "a failed conversion leaves no file"
    );
}

#[test]
fn a_checkpoint_over_the_memory_budget_is_refused_before_quantizing() {
    let f = smollm2_checkpoint();
    let cache = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["serve", "--port", "0"])
        .env("STUDENT_BASE_MODEL", &f.checkpoint)
        .env("DUET_MEMORY_MAX_BYTES", "64MiB")
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("memory budget") && err.contains("64.0 MiB"),
        "{err}"
    );
    let log = String::from_utf8_lossy(&output.stdout);
    let progress = log
        .lines()
        .any(|l| l.contains("quantized") && l.trim_end().ends_with('%'));
    assert!(!progress, "nothing is quantized: {log}");
    assert!(nothing_in(cache.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_checkpoint_answers_like_its_gguf() {
    // Qwen2: query/key/value biases, an output head of its own, no row reordering; bf16,
    // as Qwen publishes its weights.
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("Qwen2.5-Coder-0.5B-Instruct");
    let weights = make_checkpoint(&model_path(QWEN), &checkpoint, Dtype::BF16);
    assert!(weights.contains_key("model.layers.0.self_attn.q_proj.bias"));
    drop(weights);
    let (_source_guard, source) =
        start_duet(&["--model", &model_path(QWEN).display().to_string()], &[]);
    let want = answers(&source).await;
    let cache = root.path().join("cache");
    let (_guard, base) = serve(&checkpoint, &cache, &[("STUDENT_LOAD_IN_4BIT", "0")]);
    let got = answers(&base).await;
    let same = agreeing("qwen q8_0", &want, &got);
    assert!(same >= 4, "only {same} of {} answers agree", PROMPTS.len());
    // The Python app's default profile: 4 bits.
    let (_guard, base) = serve(&checkpoint, &cache, &[("STUDENT_LOAD_IN_4BIT", "1")]);
    let got = answers(&base).await;
    let same = agreeing("qwen q4_k_m", &want, &got);
    assert!(same >= 3, "only {same} of {} answers agree", PROMPTS.len());
    assert!(got[0].contains("Paris"), "{}", got[0]);
}
