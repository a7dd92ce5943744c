//! The official OpenAI Python SDK against duet's real models (`scripts/install-sdk.sh`
//! installs it, and `scripts/test.sh` runs that first): tests/sdk/structured.py checks
//! `beta.chat.completions.parse` with a Pydantic model at temperature 1, `json_object`, tools
//! with each `tool_choice`, a streamed call accumulated by the SDK, and a tool's result read
//! back.

mod common;

use std::path::Path;
use std::process::Command;

use common::{QWEN, SMOLLM2, model_id, qwen, smollm2};

#[test]
fn the_python_sdk_gets_structured_output_and_tool_calls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("DUET_SDK_VENV")
        .unwrap_or_else(|_| format!("{}/.cache/duet/sdk-venv", std::env::var("HOME").unwrap()));
    let python = Path::new(&venv).join("bin/python");
    assert!(
        python.is_file(),
        "the OpenAI SDK is missing: run scripts/install-sdk.sh (scripts/test.sh does)"
    );
    for (base, model) in [(qwen(), QWEN), (smollm2(), SMOLLM2)] {
        let run = Command::new(&python)
            .arg(root.join("tests/sdk/structured.py"))
            .arg(base)
            .arg(model_id(model))
            .output()
            .expect("run the SDK script");
        assert!(
            run.status.success() && String::from_utf8_lossy(&run.stdout).contains("ok"),
            "{model}: the SDK script failed:\n{}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
}
