//! The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright's
//! Python package; `scripts/install-browser.sh` installs both, and `scripts/test.sh` runs it
//! first): tests/browser/chat_page.py loads it from a duet running the real SmolLM2 model,
//! sends messages, stops an answer and checks the server ended that generation. It leaves a
//! screenshot in target/chat-page.png.

mod common;

use std::path::Path;
use std::process::Command;

use common::{SMOLLM2, config_for, spawn};

#[test]
fn the_chat_page_works_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Where scripts/install-browser.sh puts Playwright (the test installs nothing itself).
    let venv = std::env::var("DUET_BROWSER_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/duet/browser-venv",
            std::env::var("HOME").unwrap()
        )
    });
    let python = Path::new(&venv).join("bin/python");
    assert!(
        python.is_file() && Path::new("/usr/bin/chromium").is_file(),
        "Chromium or Playwright is missing: run scripts/install-browser.sh (scripts/test.sh does)"
    );
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
