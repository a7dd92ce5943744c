#!/usr/bin/env bash
# Runs every test of duet: fetches the real models the tests use, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all
scripts/install-browser.sh >/dev/null   # Chromium and Playwright for tests/browser.rs
scripts/install-sdk.sh >/dev/null       # OpenAI's Python SDK for tests/openai_sdk.rs
scripts/install-scale-out.sh            # Redis and nginx for tests/scale_out.rs
cargo test --release "$@"
