#!/usr/bin/env python3
"""Memory under load: many concurrent streaming clients against duet, for each target.

A target is a model file or a config file (config/*.toml); `--budget` applies a memory
budget to every target. For each target this script starts a teacher (a second duet in
student mode serving SmolLM2, so hybrid hand-overs get real answers), starts duet with the
target, records its idle RSS, runs CLIENTS streaming clients for SECONDS (each sends a
request, reads the whole stream, repeats; no new requests after the deadline, every
outstanding one is waited for), then waits for the idle unload and reads RSS again. It
prints, per target: the budget, peak RSS (VmHWM, the kernel's high-water mark) and whether it
crossed the budget, answers by backend, refusals (429/503) and other failures, the
slowest request, and RSS before the first load against RSS after the idle unload.

usage: scripts/bench-memory.py [--seconds 60] [--clients 64] [--max-tokens 48]
                               [--budget SIZE] TARGET...
"""

import argparse
import http.client
import json
import os
import random
import subprocess
import threading
import time

from benchlib import free_port, proc_kib, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "duet")
SMOLLM2 = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
KEEP_ALIVE_S = 5
TOPICS = ["rivers", "bread", "trains", "owls", "glass", "rain", "maps", "salt", "bees", "ink"]


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    return json.loads(c.getresponse().read())


def start(args, env):
    port = free_port()
    proc = subprocess.Popen([BINARY, "serve", "--port", str(port), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn", **env})
    wait_http(port, proc, "/health")
    return proc, port


def client(port, model, deadline, max_tokens, results, lock):
    while time.time() < deadline:
        body = json.dumps({
            "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"Write a few sentences about {random.choice(TOPICS)}."}],
        })
        began = time.time()
        outcome = "failed"
        backend = None
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            backend = r.getheader("x-duet-backend")
            text = r.read().decode(errors="replace")
            if r.status == 200 and text.endswith("data: [DONE]\n\n") and '"error"' not in text:
                outcome = "answered"
            elif r.status in (429, 503) and '"error"' in text:
                outcome = "refused"
                time.sleep(float(r.getheader("retry-after") or 1))
        except OSError:
            pass
        with lock:
            results.append((outcome, backend, time.time() - began))


def run(target, args):
    teacher, teacher_port = start(["--model", SMOLLM2], {})
    flags = ["--config", target] if target.endswith(".toml") else ["--model", target]
    env = {
        "TEACHER_BASE_URL": f"http://127.0.0.1:{teacher_port}/v1",
        "TEACHER_MODEL": "SmolLM2-135M-Instruct.Q4_1",
        "DUET_MEMORY_KEEP_ALIVE": f"{KEEP_ALIVE_S}s",
    }
    if args.budget:
        env["DUET_MEMORY_MAX_BYTES"] = args.budget
    proc, port = start(flags, env)
    try:
        get(port, "/v1/models")
        idle_kib = proc_kib(proc.pid, "VmRSS")
        health = get(port, "/health")
        budget = health["memory"]["budget_bytes"]
        model = get(port, "/v1/models")["data"][0]["id"]
        results, lock = [], threading.Lock()
        deadline = time.time() + args.seconds
        threads = [threading.Thread(target=client, args=(port, model, deadline, args.max_tokens, results, lock))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak_kib = proc_kib(proc.pid, "VmHWM")
        time.sleep(KEEP_ALIVE_S + 2)
        state = get(port, "/health")["student"]
        after_kib = proc_kib(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        teacher.terminate()
        proc.wait()
        teacher.wait()
    count = lambda o, b=None: sum(1 for r in results if r[0] == o and (b is None or r[1] == b))
    return {
        "target": os.path.basename(target), "budget_mb": budget / 1e6, "peak_mb": peak_kib * 1024 / 1e6,
        "crossed": "yes" if peak_kib * 1024 > budget else "no",
        "student": count("answered", "student"), "teacher": count("answered", "teacher"),
        "refused": count("refused"), "failed": count("failed"),
        "slowest_s": max((r[2] for r in results), default=0),
        "idle_mb": idle_kib * 1024 / 1e6, "after_mb": after_kib * 1024 / 1e6,
        "unloaded": state["state"] if state else "no student",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--budget")
    ap.add_argument("targets", nargs="+")
    args = ap.parse_args()
    rows = [run(t, args) for t in args.targets]
    print(f"{args.clients} streaming clients for {args.seconds} s, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} CPUs; budget {args.budget or 'from each target'}\n")
    print("| target | budget MB | peak RSS MB | crossed budget | answered by student | handed to teacher "
          "| refused 429/503 | failed | slowest s | RSS idle MB | RSS after unload MB | state after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['budget_mb']:.0f} | {r['peak_mb']:.0f} | {r['crossed']} | {r['student']} | "
              f"{r['teacher']} | {r['refused']} | {r['failed']} | {r['slowest_s']:.1f} | {r['idle_mb']:.1f} | "
              f"{r['after_mb']:.1f} | {r['unloaded']} |")


if __name__ == "__main__":
    main()
