#!/usr/bin/env bash
# Starts duet on 127.0.0.1:8080 with the default model, fetching the model and building
# duet first when needed. Extra arguments go to `duet serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh qwen2.5
# Build progress shows: the first build takes minutes, and should say so.
exec cargo run --release -- serve "$@"
