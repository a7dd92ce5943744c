#!/usr/bin/env python3
"""Decoding speed with a JSON schema against free text, for each model given.

Starts target/release/duet on a free loopback port and sends, in alternation, ROUNDS
streamed greedy requests for the same list of inventions: as free text, and held to a JSON
schema (`response_format: json_schema`, an array of 8 to 12 objects). Prints the median
decode tok/s of each (tokens after the first / time from the first to the last delta) and
their ratio: what checking every sampled token against the grammar, and masking the
vocabulary when one is refused, costs.

usage: scripts/bench-grammar.py [--rounds N] MODEL.gguf...
"""

import argparse
import os
import statistics
import subprocess

from benchlib import free_port, stream_chat, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "duet")
PROMPT = "List ten inventions of the nineteenth century with the year each was made, one per line."
SCHEMA = {
    "type": "object",
    "properties": {"inventions": {"type": "array", "minItems": 8, "maxItems": 12, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "year": {"type": "integer"}},
        "required": ["name", "year"], "additionalProperties": False}}},
    "required": ["inventions"], "additionalProperties": False,
}


def rate(port, model, schema, tag):
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": 200,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"({tag}) {PROMPT}"}]}
    if schema:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "inventions", "schema": SCHEMA}}
    _, stamps, _, usage = stream_chat(port, body)
    return (usage["completion_tokens"] - 1) / (stamps[-1] - stamps[0]), usage["completion_tokens"]


def bench(path, rounds):
    name = os.path.basename(path).removesuffix(".gguf")
    port = free_port()
    server = subprocess.Popen([BINARY, "serve", "--port", str(port), "--model", path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_http(port, server)
        rate(port, name, True, "warm-up")  # builds the model's grammar compiler once
        free, bound = [], []
        for i in range(rounds):
            free.append(rate(port, name, False, f"round {i}"))
            bound.append(rate(port, name, True, f"round {i}"))
    finally:
        server.terminate()
        server.wait()
    f, b = statistics.median(r for r, _ in free), statistics.median(r for r, _ in bound)
    tokens = (statistics.median(t for _, t in free), statistics.median(t for _, t in bound))
    return name, f, b, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    rows = [bench(m, args.rounds) for m in args.models]
    print(f"greedy, streamed, {args.rounds} alternating rounds, medians\n")
    print("| model | decode tok/s free text | with a JSON schema | ratio | tokens free / schema |")
    print("|---|---|---|---|---|")
    for name, f, b, (tf, tb) in rows:
        print(f"| {name} | {f:.1f} | {b:.1f} | {b / f:.2f}x | {tf:.0f} / {tb:.0f} |")


if __name__ == "__main__":
    main()
