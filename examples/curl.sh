#!/usr/bin/env bash
# duet from the shell: list models, ask once, then stream an answer token by token.
# usage: examples/curl.sh [base-url]   (default http://127.0.0.1:8080)
set -euo pipefail
base="${1:-http://127.0.0.1:8080}"
model="$(curl -s "$base/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"

echo "== GET /v1/models"
curl -s "$base/v1/models"; echo

echo "== POST /v1/chat/completions"
curl -s "$base/v1/chat/completions" -H 'Content-Type: application/json' -d @- <<JSON
{"model": "$model", "temperature": 0, "max_tokens": 40,
 "messages": [{"role": "system", "content": "You are concise."},
              {"role": "user", "content": "What is a GGUF file?"}]}
JSON
echo

echo "== streamed (curl -N shows each event as it arrives)"
curl -sN "$base/v1/chat/completions" -H 'Content-Type: application/json' -d @- <<JSON
{"model": "$model", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 24,
 "messages": [{"role": "user", "content": "Count from one to five."}]}
JSON
