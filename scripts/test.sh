#!/usr/bin/env bash
# Runs every test of duet: fetches the real models the tests use, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh all
cargo test --release "$@"
