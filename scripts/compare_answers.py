#!/usr/bin/env python3
"""Asks a running duet (or any OpenAI-compatible server) the prompts of a transformers
reference file and counts the answers that equal the reference's.

The reference is a reference-<model>.json written by scripts/transformers_reference.py. Each
prompt is sent as one user message to /v1/chat/completions with temperature 0 and max_tokens
K, to the first model /v1/models lists; the answer agrees when it equals the reference's first
K generated tokens, decoded with the checkpoint's tokenizer.json (special tokens skipped,
surrounding whitespace ignored). Prints OK or DIFF per prompt and a last line
"N/M agree on the first K tokens"; exits 0 whatever the count.

Run it with the Python of a virtual environment that has the `tokenizers` package.

usage: scripts/compare_answers.py REFERENCE.json [--base-url http://127.0.0.1:8080]
                                  [--answers base|lora] [--tokens 8] [--tokenizer tokenizer.json]
"""
import argparse
import json
import os
import urllib.request

from tokenizers import Tokenizer


def find_tokenizer(ref, ref_path):
    """The checkpoint's tokenizer.json: where the reference says, else ckpt-<model> beside it."""
    candidates = [os.path.join(ref.get("checkpoint_dir", ""), "tokenizer.json"),
                  os.path.join(os.path.dirname(os.path.abspath(ref_path)), f"ckpt-{ref.get('model')}",
                               "tokenizer.json")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise SystemExit(f"no tokenizer.json found (tried {', '.join(candidates)}); pass --tokenizer")


def get_json(url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description="Compare a server's greedy answers with a transformers reference.")
    ap.add_argument("reference", help="reference-<model>.json from scripts/transformers_reference.py")
    ap.add_argument("--base-url", default="http://127.0.0.1:8080",
                    help="the server, without /v1 (default: http://127.0.0.1:8080)")
    ap.add_argument("--answers", choices=["base", "lora"], default="base",
                    help="which reference answers to compare with: the base model's or base+LoRA's (default: base)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated and compared (default: 8)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the reference's checkpoint's)")
    args = ap.parse_args()

    ref = json.load(open(args.reference, encoding="utf-8"))
    tok = Tokenizer.from_file(args.tokenizer or find_tokenizer(ref, args.reference))
    base = args.base_url.rstrip("/")
    model = get_json(base + "/v1/models")["data"][0]["id"]
    n = args.tokens

    records = ref["prompts"]
    agree = 0
    for r in records:
        ids = r[args.answers]["generated_ids"]
        want = tok.decode(ids[:n], skip_special_tokens=True)
        body = {"model": model, "messages": [{"role": "user", "content": r["prompt"]}],
                "temperature": 0, "max_tokens": n}
        got = get_json(base + "/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""
        ok = got.strip() == want.strip()
        agree += ok
        print("OK  " if ok else "DIFF", repr(r["prompt"][:40]), "| want", repr(want), "| got", repr(got), flush=True)
    print(f"{agree}/{len(records)} agree on the first {n} tokens")


if __name__ == "__main__":
    main()
