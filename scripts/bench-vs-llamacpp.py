#!/usr/bin/env python3
"""duet beside llama.cpp's server on the same GGUF, the same thread count, the same CPU.

Installs llama.cpp's server from PyPI (llama-cpp-python[server], compiled from source, about
five minutes) into a virtual environment outside the repository (~/.cache/duet-bench/venv),
serves the same GGUF with both servers, and sends them the same streamed greedy requests in
alternation: a ~500-token prompt whose first words change every round (so no prompt cache
helps either side) and 128 generated tokens. Prints the medians of time to first token,
prefill tok/s and decode tok/s for both, the ratios duet/llama.cpp, and each server's peak RSS.

Then, per server: the prompt cache (time to first token of a ~1,000-token conversation's
second turn over its first) and concurrency (aggregate tok/s of 4 simultaneous streams of 128
tokens over one stream alone, short prompts).

Then a prompt-length sweep (--lengths, ~500, ~1,500 and ~3,500 tokens by default): fresh
prompts of each length, one generated token, alternating servers; prefill tok/s of both, the
ratio, and each server's rate as a share of its own rate at the shortest length.
--sweep-only skips everything before it; --duet names another duet binary.

--llamacpp-avx2 runs llama.cpp built for AVX2 only (its own virtual environment, compiled with
GGML_NATIVE=OFF, AVX2, FMA, F16C and no AVX-512); pair it with DUET_STUDENT_KERNELS=avx2 to
compare the two servers' AVX2 kernels on any x86-64 machine that has AVX-512 too.

--busy-core keeps one core busy with a Python loop (`while True: pass`) from the servers' start
to their end, as an IDE, a browser or a compiler would beside a local server.

usage: scripts/bench-vs-llamacpp.py [--rounds 5] [--threads 2] [--lengths 500,1500,3500]
                                    [--sweep-only] [--busy-core] [--llamacpp-avx2] [--duet PATH]
                                    MODEL.gguf...
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading

from benchlib import free_port, proc_kib, stream_chat, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUET = os.path.join(ROOT, "target", "release", "duet")
VENV = os.path.expanduser("~/.cache/duet-bench/venv")
VENV_AVX2 = os.path.expanduser("~/.cache/duet-bench/venv-avx2")
# llama.cpp for CPUs with AVX2 and without AVX-512, whatever CPU builds it.
AVX2_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                   "-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF")
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps and "
    "listening to the sea. Ships passed far out on the horizon, their lights small and steady, "
    "and the keeper wrote their names in a worn notebook beside the date and the weather. "
)


def ensure_llamacpp(avx2=False):
    venv = VENV_AVX2 if avx2 else VENV
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    try:
        subprocess.check_call([python, "-c", "import llama_cpp.server"], stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        print("installing llama-cpp-python[server] (compiles llama.cpp, ~5 min)...", file=sys.stderr)
        command = [python, "-m", "pip", "install", "-q", "llama-cpp-python[server]==0.3.36"]
        env = dict(os.environ)
        if avx2:
            # From source, never a wheel built (or cached) for another CPU level.
            command += ["--no-binary", "llama-cpp-python", "--no-cache-dir"]
            env["CMAKE_ARGS"] = AVX2_CMAKE_ARGS
        subprocess.check_call(command, env=env)
    return python


# Tokens per PARAGRAPH with either model's tokenizer (about 51), to size the sweep's prompts.
TOKENS_PER_PARAGRAPH = 51


def prompt_for(prefix, paragraphs=8):
    return f"Note {prefix}. " + PARAGRAPH * paragraphs + "Summarise the notes above in a few sentences."


def stream(port, model, messages, max_tokens):
    """One streamed greedy request: its start time, the arrival time of every chunk with
    content, and the text."""
    start, stamps, text, _ = stream_chat(port, {
        "model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
        "messages": messages,
    })
    return start, stamps, text


def round_trip(port, model, prefix, max_tokens):
    start, stamps, _ = stream(port, model, [{"role": "user", "content": prompt_for(prefix)}], max_tokens)
    return start, stamps


def conversation(port, model, tag):
    """Time to first token of turn one (a ~1,000-token message) and of turn two (the same
    conversation, the answer, and a short question)."""
    first = [{"role": "user", "content": prompt_for(tag, 18)}]
    s1, st1, answer = stream(port, model, first, 32)
    second = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "Which ships did the keeper write down?"}]
    s2, st2, _ = stream(port, model, second, 4)
    return st1[0] - s1, st2[0] - s2


def aggregate_rate(port, model, tag, streams):
    """Tokens per second over all of `streams` simultaneous 128-token streams, from the first
    request to the last token."""
    results = [None] * streams

    def one(i):
        # A prompt both models answer at length (all 128 tokens), so that decoding dominates.
        messages = [{"role": "user", "content": f"({tag}) Stream {i + 1}: count from 1 to 300, one number per line."}]
        results[i] = stream(port, model, messages, 128)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(len(r[1]) for r in results)
    return tokens / (max(r[1][-1] for r in results if r[1]) - min(r[0] for r in results))


def prompt_tokens(port, name, prompt):
    """The prompt's token count as duet's tokenizer sees it (chat template included)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", json.dumps({"model": name, "max_tokens": 1,
              "messages": [{"role": "user", "content": prompt}]}), {"Content-Type": "application/json"})
    return json.loads(c.getresponse().read())["usage"]["prompt_tokens"]


def sweep(dp, lp, name, lengths, rounds):
    """Median prefill tok/s of both servers for fresh prompts of about each length."""
    rows = []
    for target in lengths:
        paragraphs = max(1, round(target / TOKENS_PER_PARAGRAPH))
        tokens = prompt_tokens(dp, name, prompt_for(f"sweep {target} size", paragraphs))
        rates = {"duet": [], "llama.cpp": []}
        for i in range(rounds):
            order = [(dp, "duet"), (lp, "llama.cpp")] if i % 2 == 0 else [(lp, "llama.cpp"), (dp, "duet")]
            for port, who in order:
                start, stamps, _ = stream(port, name, [{"role": "user", "content": prompt_for(
                    f"sweep {target} round {i} {who}", paragraphs)}], 1)
                rates[who].append(tokens / (stamps[0] - start))
        rows.append((tokens, statistics.median(rates["duet"]), statistics.median(rates["llama.cpp"])))
    return rows


def bench(model_path, rounds, threads, llama_python, lengths, sweep_only, duet_binary, busy_core):
    name = os.path.basename(model_path).removesuffix(".gguf")
    dp, lp = free_port(), free_port()
    env = {**os.environ, "RUST_LOG": "warn", "DUET_STUDENT_THREADS": str(threads)}
    duet = subprocess.Popen([duet_binary, "serve", "--port", str(dp), "--model", model_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    llama = subprocess.Popen([llama_python, "-m", "llama_cpp.server", "--model", model_path, "--port", str(lp),
                              "--n_threads", str(threads), "--n_threads_batch", str(threads),
                              "--n_ctx", str(max(2048, max(lengths) + 512)), "--verbose", "false",
                              # queue concurrent requests instead of cutting the running one
                              "--interrupt_requests", "false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy_core else None
    try:
        wait_http(dp, duet)
        wait_http(lp, llama, seconds=120)
        for port, who in [(dp, "duet"), (lp, "llama.cpp")]:
            round_trip(port, name, "warm-up", 4)
        lengths_rows = sweep(dp, lp, name, lengths, rounds)
        if sweep_only:
            return name, None, None, None, None, lengths_rows
        results = {"duet": [], "llama.cpp": []}
        for i in range(rounds):
            for port, who in [(dp, "duet"), (lp, "llama.cpp")] if i % 2 == 0 else [(lp, "llama.cpp"), (dp, "duet")]:
                start, stamps = round_trip(port, name, f"round {i} {who}", 128)
                results[who].append((stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])))
        turns, concurrency = {}, {}
        for port, who in [(dp, "duet"), (lp, "llama.cpp")]:
            turns[who] = conversation(port, name, f"conversation {who}")
            single = aggregate_rate(port, name, f"single {who}", 1)
            concurrency[who] = (single, aggregate_rate(port, name, f"four {who}", 4))
        # The prompt's token count, as duet's tokenizer sees it, for the prefill rate.
        tokens = prompt_tokens(dp, name, prompt_for("round 0 duet"))
        peaks = {"duet": proc_kib(duet.pid, "VmHWM"), "llama.cpp": proc_kib(llama.pid, "VmHWM")}
    finally:
        if busy:
            busy.kill()
            busy.wait()
        duet.terminate()
        llama.terminate()
        duet.wait()
        llama.wait()
    rows = {}
    for who, rs in results.items():
        ttft = statistics.median(r[0] for r in rs)
        rows[who] = (ttft * 1000, tokens / ttft, statistics.median(r[1] for r in rs), peaks[who] / 1024)
    return name, tokens, rows, turns, concurrency, lengths_rows


def print_sweep(out, lengths):
    print(f"\nPrompt-length sweep: fresh prompts, 1 generated token; prefill tok/s duet / llama.cpp (ratio); "
          f"in brackets each server's rate over its own at ~{lengths[0]} tokens.\n")
    print("| model | prompt tok | prefill tok/s duet / llama.cpp (ratio) | duet vs its shortest | llama.cpp vs its shortest |")
    print("|---|---|---|---|---|")
    for name, *_, rows in out:
        (_, d0, l0) = rows[0]
        for tokens, d, l in rows:
            print(f"| {name} | {tokens} | {d:.0f} / {l:.0f} ({d / l:.2f}x) | {d / d0:.2f} | {l / l0:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="500,1500,3500",
                    help="prompt lengths of the sweep, in tokens, comma-separated")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--busy-core", action="store_true", help="keep one core busy with a Python loop")
    ap.add_argument("--llamacpp-avx2", action="store_true", help="llama.cpp built for AVX2 only")
    ap.add_argument("--duet", default=DUET, help="the duet binary")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    llama_python = ensure_llamacpp(args.llamacpp_avx2)
    out = [bench(m, args.rounds, args.threads, llama_python, lengths, args.sweep_only, args.duet,
                 args.busy_core)
           for m in args.models]
    print(f"{args.threads} threads, {args.rounds} alternating rounds, medians; greedy, streamed over HTTP; "
          f"llama.cpp = llama-cpp-python 0.3.36 server"
          + (" built for AVX2 only" if args.llamacpp_avx2 else "")
          + (f"; duet kernels: {os.environ['DUET_STUDENT_KERNELS']}" if os.environ.get("DUET_STUDENT_KERNELS") else "")
          + ("; one core kept busy by `while True: pass`" if args.busy_core else ""))
    if args.sweep_only:
        print_sweep(out, lengths)
        return
    print("128 generated tokens\n")
    print("| model | prompt tok | TTFT ms duet / llama.cpp | prefill tok/s duet / llama.cpp (ratio) "
          "| decode tok/s duet / llama.cpp (ratio) | peak RSS MB duet / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for name, pt, r, *_ in out:
        d, l = r["duet"], r["llama.cpp"]
        print(f"| {name} | {pt} | {d[0]:.0f} / {l[0]:.0f} | {d[1]:.0f} / {l[1]:.0f} ({d[1] / l[1]:.2f}x) | "
              f"{d[2]:.1f} / {l[2]:.1f} ({d[2] / l[2]:.2f}x) | {d[3]:.0f} / {l[3]:.0f} |")
    print("\nPrompt cache: time to first token of a ~1,000-token conversation's second turn over its first.")
    print("Concurrency: aggregate tok/s of 4 simultaneous 128-token streams over 1 stream alone.\n")
    print("| model | turn 2 / turn 1 TTFT ms duet | llama.cpp | 4 streams / 1 stream tok/s duet | llama.cpp |")
    print("|---|---|---|---|---|")
    for name, _, _, turns, conc, _ in out:
        cells = []
        for who in ("duet", "llama.cpp"):
            t1, t2 = turns[who]
            cells.append(f"{t2 * 1000:.0f} / {t1 * 1000:.0f} ({t2 / t1:.0%})")
        for who in ("duet", "llama.cpp"):
            one, four = conc[who]
            cells.append(f"{four:.1f} / {one:.1f} ({four / one:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print_sweep(out, lengths)


if __name__ == "__main__":
    main()
