#!/usr/bin/env bash
# Checks duet's quantize and serve against Hugging Face transformers on duet's two test models.
#
# scripts/transformers_reference.py turns each GGUF in models/ (smollm2, qwen) into a
# transformers checkpoint and a random PEFT LoRA adapter, and records transformers' own greedy
# float32 answers to 10 chat prompts, without and with the adapter. Then, per model, duet
# quantizes the checkpoint three times (q8_0, q8_0 with the adapter merged, q4_k_m), serves
# each GGUF and is asked the same prompts (temperature 0, 8 tokens) by
# scripts/compare_answers.py; a table of how many answers equal transformers' ends the run.
# Everything is written to target/transformers-reference.
#
# Needs a Python virtual environment with torch and transformers, created on the first run at
# $DUET_HF_VENV (default ~/.cache/duet/hf-venv): about 6 GB of disk for torch. The transformers
# step runs on the CPU, one torch thread (TORCH_THREADS=N for more): a few minutes.
# usage: scripts/compare-with-transformers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DUET_HF_VENV:-$HOME/.cache/duet/hf-venv}"
out="$PWD/target/transformers-reference"
tokens=8

scripts/fetch-models.sh all
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv (torch and transformers: about 6 GB)"
  python3 -m venv "$venv"
  # The versions the README's table was measured with.
  "$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0 peft==0.21.2 gguf==0.19.0 \
    safetensors==0.8.0 numpy==2.4.6 sentencepiece==0.2.3 accelerate==1.15.0 tokenizers==0.23.3 protobuf
fi
cargo build --release --quiet
mkdir -p "$out"

TORCH_THREADS="${TORCH_THREADS:-1}" "$venv/bin/python" scripts/transformers_reference.py --out "$out" all smollm2 qwen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() { [ -z "${duet_pid:-}" ] || kill "$duet_pid" 2>/dev/null || true; }
trap cleanup EXIT

serve_and_compare() { # model variant gguf answers -> appends a row to $rows
  local model="$1" variant="$2" gguf="$3" answers="$4" port name
  port="$(free_port)"
  name="$(basename "$gguf" .gguf)"
  RUST_LOG=warn target/release/duet serve --port "$port" --model "$gguf" >"$out/serve-$name.log" 2>&1 &
  duet_pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
    kill -0 "$duet_pid" 2>/dev/null || { cat "$out/serve-$name.log" >&2; echo "duet serve $gguf exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "== $model $variant ($answers answers), $gguf"
  "$venv/bin/python" scripts/compare_answers.py "$out/reference-$model.json" \
    --base-url "http://127.0.0.1:$port" --answers "$answers" --tokens "$tokens" | tee "$out/compare-$name.txt"
  kill "$duet_pid"; wait "$duet_pid" 2>/dev/null || true; duet_pid=
  rows+="| $model | $variant | $(tail -n 1 "$out/compare-$name.txt" | cut -d' ' -f1) |"$'\n'
}

rows=""
for model in smollm2 qwen; do
  ckpt="$out/ckpt-$model"
  target/release/duet quantize "$ckpt" "$out/$model-q8_0.gguf" --type q8_0
  serve_and_compare "$model" q8_0 "$out/$model-q8_0.gguf" base
  target/release/duet quantize "$ckpt" "$out/$model-q8_0-lora.gguf" --type q8_0 --lora "$out/lora-$model"
  serve_and_compare "$model" q8_0+LoRA "$out/$model-q8_0-lora.gguf" lora
  target/release/duet quantize "$ckpt" "$out/$model-q4_k_m.gguf" --type q4_k_m
  serve_and_compare "$model" q4_k_m "$out/$model-q4_k_m.gguf" base
done

echo
echo "greedy answers equal to transformers' (float32, CPU) on the first $tokens tokens, 10 chat prompts"
echo
echo "| model | type | agree |"
echo "|---|---|---|"
printf '%s' "$rows"

# llama.cpp loads the files duet wrote (scripts/bench-vs-llamacpp.py builds llama-cpp-python
# into ~/.cache/duet-bench/venv; without it this part is skipped).
llama_python="$HOME/.cache/duet-bench/venv/bin/python"
if [ -x "$llama_python" ] && "$llama_python" -c 'import llama_cpp' 2>/dev/null; then
  echo
  echo "llama.cpp (llama-cpp-python) on the same files: greedy answer, and the ids of 'Hello, world!'"
  "$llama_python" - "$out"/*.gguf <<'PY'
import sys
from llama_cpp import Llama
for path in sys.argv[1:]:
    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=8)
    ids = llm.tokenize(b"Hello, world!", add_bos=False)
    print(f"{path.rsplit('/', 1)[-1]}: {answer['choices'][0]['message']['content']!r}, {ids}")
PY
else
  echo "(llama.cpp check skipped: run scripts/bench-vs-llamacpp.py once to build llama-cpp-python)"
fi
