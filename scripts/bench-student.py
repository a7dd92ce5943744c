#!/usr/bin/env python3
"""Benchmarks duet's student over HTTP, as clients see it, for each model given.

For every model: starts target/release/duet on a free loopback port, sends ROUNDS streamed
greedy requests whose ~100-token prompt starts with a fresh prefix (so nothing is reused
between rounds), and reports the medians of
  - time to first token (request sent -> first content delta),
  - prefill tok/s (prompt tokens / time to first token),
  - decode tok/s (tokens after the first / time from first to last delta),
and the server's peak RSS (VmHWM): whole, and less the key/value cache of the longest
sequence (which grows with use), as a multiple of the GGUF file size.

usage: scripts/bench-student.py [--rounds N] [--max-tokens N] MODEL.gguf...
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys

from benchlib import free_port, proc_kib, stream_chat, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "duet")

# About 100 tokens for both tokenizers once the chat template is applied.
PROMPT = (
    "Here are some notes about the history of printing. Movable type was invented in China "
    "around 1040, and metal type appeared in Korea in the thirteenth century. In Europe, "
    "Johannes Gutenberg combined a press, oil-based ink and cast metal type around 1450. "
    "Summarize these notes in a few sentences, then explain why printing mattered."
)


def one_round(port, model, prefix, max_tokens):
    start, stamps, _, usage = stream_chat(port, {
        "model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"[{prefix}] {PROMPT}"}],
    })
    first, last = stamps[0], stamps[-1]
    ttft = first - start
    decoded = usage["completion_tokens"] - 1
    return {
        "ttft": ttft,
        "prefill": usage["prompt_tokens"] / ttft,
        "decode": decoded / (last - first) if last > first else float("nan"),
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }


def bench(path, rounds, max_tokens):
    port = free_port()
    name = os.path.basename(path).removesuffix(".gguf")
    proc = subprocess.Popen([BINARY, "serve", "--port", str(port), "--model", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_http(port, proc)
        idle_rss = proc_kib(proc.pid, "VmRSS") * 1024
        one_round(port, name, "warm-up", 4)  # loads the model
        results = [one_round(port, name, f"round {i}", max_tokens) for i in range(rounds)]
        peak = proc_kib(proc.pid, "VmHWM") * 1024
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        kv_per_token = json.loads(c.getresponse().read())["student"]["kv_bytes_per_token"]
    finally:
        proc.terminate()
        proc.wait()
    med = lambda k: statistics.median(r[k] for r in results)
    size = os.path.getsize(path)
    # The longest sequence's key/value cache, the part of the peak that grows with use.
    kv = max(r["prompt_tokens"] + r["completion_tokens"] for r in results) * kv_per_token
    return {
        "model": name, "file_mb": size / 1e6, "prompt_tokens": results[0]["prompt_tokens"],
        "completion_tokens": med("completion_tokens"), "ttft_ms": med("ttft") * 1000,
        "prefill": med("prefill"), "decode": med("decode"), "idle_mb": idle_rss / 1e6,
        "peak_mb": peak / 1e6, "kv_mb": kv / 1e6, "ratio": (peak - kv) / size,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        sys.exit("build first: cargo build --release")
    rows = [bench(m, args.rounds, args.max_tokens) for m in args.models]
    print(f"{os.cpu_count()} CPUs, {args.rounds} rounds, medians; greedy, streamed over HTTP\n")
    print("| model | GGUF MB | prompt tok | TTFT ms | prefill tok/s | decode tok/s | RSS idle MB | peak RSS MB | KV in use MB | (peak - KV) / GGUF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['file_mb']:.0f} | {r['prompt_tokens']} | {r['ttft_ms']:.0f} | "
              f"{r['prefill']:.0f} | {r['decode']:.1f} | {r['idle_mb']:.1f} | {r['peak_mb']:.0f} | {r['kv_mb']:.1f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
