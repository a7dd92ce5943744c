//! The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright's
//! Python package; `scripts/install-browser.sh` installs both): tests/browser/chat_page.py
//! loads it from a duet running the real SmolLM2 model, sends messages, stops an answer and
//! checks the server ended that generation. It leaves a screenshot in target/chat-page.png.

mod common;

use std::path::Path;
use std::process::Command;

use common::{SMOLLM2, config_for, spawn};

#[test]
fn the_chat_page_works_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let install = Command::new(root.join("scripts/install-browser.sh"))
        .output()
        .expect("run scripts/install-browser.sh");
    assert!(
        install.status.success(),
        "installing the browser failed: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let python = String::from_utf8(install.stdout)
        .unwrap()
        .trim()
        .to_string();
    let base = spawn(config_for(SMOLLM2));
    let screenshot = root.join("target/chat-page.png");
    let run = Command::new(python)
        .arg(root.join("tests/browser/chat_page.py"))
        .arg(&base)
        .arg(&screenshot)
        .output()
        .expect("run the browser script");
    assert!(
        run.status.success(),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(screenshot.is_file());
}
