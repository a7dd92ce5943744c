#!/usr/bin/env python3
"""Keystroke latency of fill-in-the-middle completion: duet beside llama.cpp's server.

Replays an IDE session: a Python module of about 1,500 tokens is open, the cursor sits inside
a function two thirds of the way down, and a new line of code is typed one character at a
time. Every keystroke sends one fill-in-the-middle completion, its prompt built client-side
the way an editor extension builds it for Qwen2.5-Coder:

    <|fim_prefix|>{text before the cursor}<|fim_suffix|>{text after it}<|fim_middle|>

as `POST /v1/completions` (greedy, 16 tokens, non-streamed, the usual FIM stop strings). Each
request is timed end to end, from sending it to having read the whole answer. Consecutive
prompts differ only from the cursor on, so a server that keeps the previous prompt's tokens
computed re-reads only those from the edit on: the typed line and the text after the cursor
(about 450 tokens here), not the 1,000 before it. Both servers do this: duet reports it as
usage.prompt_tokens_details.cached_tokens; llama-cpp-python keeps the previous request's
tokens and reuses their longest common prefix ("prefix-match hit" in its verbose log).

The reference is llama.cpp's server as packaged on PyPI (llama-cpp-python 0.3.36,
`python -m llama_cpp.server`), installed into ~/.cache/duet-bench/venv on first use (it compiles
llama.cpp, about five minutes). Both servers load the same GGUF with the same thread count
and a 4,096-token context, one after the other so they never share the CPU: llama.cpp's server
starts, receives the session, stops; then duet's. Before the timed keystrokes each server gets
the prompt of the freshly opened file (nothing typed yet) once, untimed, so both measure
steady typing rather than the first read of the file.

Prints, per server, the prompt size and the p50, p90 and mean keystroke latency and the peak
RSS; the ratio of the p50s (llama.cpp / duet); the mean number of prompt tokens duet served
from its cache per request (usage.prompt_tokens_details.cached_tokens); and on how many
keystrokes the two servers' completions agree.

usage:
    cargo build --release && scripts/bench-keystrokes.py
    scripts/bench-keystrokes.py [--model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]
        [--threads 2] [--keystrokes 40] [--max-tokens 16] [--only llamacpp|duet]

duet's binary is target/release/duet; scripts/fetch-models.sh fetches the default model.
"""

import argparse
import http.client
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from benchlib import free_port, proc_kib, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUET = os.path.join(ROOT, "target", "release", "duet")
DEFAULT_MODEL = os.path.join("models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
CONTEXT = 4096  # duet's default student.context_length; llama.cpp's server gets the same
STOP = ["\n\n", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>", "<|file_sep|>"]
START_SECONDS = 180
REQUEST_SECONDS = 300


def ensure_llamacpp():
    """llama-cpp-python's interpreter, installed by bench-vs-llamacpp.py's ensure_llamacpp."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench-vs-llamacpp.py")
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_llamacpp()


# The open file: a fixed module of about 1,500 Qwen tokens. CURSOR marks the empty line, inside
# `price_statistics` two thirds of the way down, where the session types TYPED.
CURSOR = "<<cursor>>"
TYPED = "    total = sum(values) / len(values)\n    spread = max(values) - min(values)"
FILE = '''"""Inventory bookkeeping for a small hardware store.

Reads stock records from CSV exports, keeps them in an in-memory inventory, and
prints the reports the shop floor asks for at closing time: what to reorder,
what the shelves are worth, and how prices are spread across categories.
"""

import csv
import datetime
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

REORDER_MARGIN = 1.25
DEFAULT_CATEGORY = "misc"


@dataclass
class Item:
    """One stock-keeping unit and its current state on the shelves."""

    sku: str
    name: str
    category: str = DEFAULT_CATEGORY
    price: float = 0.0
    quantity: int = 0
    reorder_level: int = 0

    def value(self):
        """The shelf value of this item: its price times the units in stock."""
        return self.price * self.quantity

    def needs_reorder(self):
        """True when the stock has fallen to the reorder level or below."""
        return self.quantity <= self.reorder_level


def parse_price(text):
    """Parse a price such as "12.50", "$12.50" or "12,50"; None if unreadable."""
    cleaned = text.strip().lstrip("$").replace(",", ".")
    if not cleaned:
        return None
    try:
        return float(cleaned)
    except ValueError:
        log.warning("unreadable price %r", text)
        return None


def parse_row(row):
    """Turn one CSV row (a dict of strings) into an Item, or None if it is unusable."""
    sku = row.get("sku", "").strip()
    if not sku:
        return None
    price = parse_price(row.get("price", ""))
    if price is None:
        price = 0.0
    try:
        quantity = int(row.get("quantity", "0") or 0)
        reorder_level = int(row.get("reorder_level", "0") or 0)
    except ValueError:
        log.warning("bad counts for %s", sku)
        return None
    return Item(
        sku=sku,
        name=row.get("name", sku).strip(),
        category=row.get("category", DEFAULT_CATEGORY).strip() or DEFAULT_CATEGORY,
        price=price,
        quantity=quantity,
        reorder_level=reorder_level,
    )


def load_items(path):
    """Read every usable item from the CSV export at `path`."""
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            item = parse_row(row)
            if item is not None:
                items.append(item)
    return items


class Inventory:
    """The store's stock, indexed by SKU, with the queries the reports need."""

    def __init__(self, items=()):
        self._items = {}
        self.updated = None
        for item in items:
            self.add(item)

    def __len__(self):
        return len(self._items)

    def add(self, item):
        """Add an item, or merge its quantity into the one already stored."""
        current = self._items.get(item.sku)
        if current is None:
            self._items[item.sku] = item
        else:
            current.quantity += item.quantity
            current.price = item.price or current.price
        self.updated = datetime.datetime.now()

    def categories(self):
        """The categories in stock, sorted by name."""
        return sorted({item.category for item in self._items.values()})

    def in_category(self, category):
        """Every item of one category, cheapest first."""
        found = [item for item in self._items.values() if item.category == category]
        return sorted(found, key=lambda item: item.price)

    def to_reorder(self):
        """Items at or below their reorder level, with the quantity to order."""
        orders = []
        for item in self._items.values():
            if item.needs_reorder():
                wanted = max(1, round(item.reorder_level * REORDER_MARGIN) - item.quantity)
                orders.append((item, wanted))
        return sorted(orders, key=lambda pair: pair[0].sku)

    def total_value(self):
        """The value of everything on the shelves."""
        return sum(item.value() for item in self._items.values())


def price_statistics(values):
    """Return the mean, the spread and the median of a list of prices.

    An empty list gives zeros, so that an empty category still prints a row
    in the closing report instead of raising.
    """
    if not values:
        return 0.0, 0.0, 0.0
<<cursor>>
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        median = ordered[middle]
    else:
        median = (ordered[middle - 1] + ordered[middle]) / 2
    return total, spread, median


def category_report(inventory):
    """One line per category: its item count, mean price, spread and median."""
    lines = []
    for category in inventory.categories():
        prices = [item.price for item in inventory.in_category(category)]
        mean, spread, median = price_statistics(prices)
        lines.append(
            f"{category:<16} {len(prices):>5} {mean:>10.2f} {spread:>10.2f} {median:>10.2f}"
        )
    return lines


def reorder_report(inventory):
    """One line per item to reorder: SKU, name, units in stock and units to order."""
    lines = []
    for item, wanted in inventory.to_reorder():
        lines.append(f"{item.sku:<10} {item.name:<30} {item.quantity:>5} {wanted:>5}")
    return lines


def closing_report(inventory, today=None):
    """The whole closing-time report as a single string."""
    today = today or datetime.date.today()
    parts = [
        f"Closing report for {today.isoformat()}",
        f"{len(inventory)} items, shelf value {inventory.total_value():.2f}",
        "",
        "Prices by category:",
        *category_report(inventory),
        "",
        "To reorder:",
        *(reorder_report(inventory) or ["nothing"]),
    ]
    return "\\n".join(parts)


def main(paths):
    """Load every export named on the command line and print the closing report."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    inventory = Inventory()
    for path in paths:
        for item in load_items(path):
            inventory.add(item)
    print(closing_report(inventory))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
'''


def fim_prompt(typed):
    """The FIM prompt after `typed` (the first characters of TYPED) has been typed."""
    before, after = FILE.split(CURSOR + "\n")
    # The cursor is on the empty line: the text after it starts with that line's newline.
    return f"<|fim_prefix|>{before}{typed}<|fim_suffix|>\n{after}<|fim_middle|>"


def complete(port, model, prompt, max_tokens):
    """One FIM completion: seconds from sending to the whole answer, and the answer."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": False, "stop": STOP})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    try:
        start = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        raw = resp.read()
        elapsed = time.perf_counter() - start
    finally:
        c.close()
    if resp.status != 200:
        sys.exit(f"the server on port {port} answered {resp.status}: {raw[:300]!r}")
    answer = json.loads(raw)
    try:
        text = answer["choices"][0]["text"]
        prompt_tokens = answer["usage"]["prompt_tokens"]
    except (KeyError, IndexError, TypeError):
        sys.exit(f"the server on port {port} answered without choices[0].text or usage: {raw[:300]!r}")
    if not isinstance(text, str):
        sys.exit(f"the server on port {port} answered a non-string choices[0].text: {raw[:300]!r}")
    cached = (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    return elapsed, text, prompt_tokens, cached


def start_llamacpp(python, model, port, threads):
    return subprocess.Popen([python, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                             "--host", "127.0.0.1",
                             "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--n_ctx", str(CONTEXT), "--verbose", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_duet(model, port, threads):
    env = {**os.environ, "RUST_LOG": "warn", "DUET_STUDENT_THREADS": str(threads),
           "DUET_SERVER_HOST": "127.0.0.1", "DUET_STUDENT_CONTEXT_LENGTH": str(CONTEXT)}
    return subprocess.Popen([DUET, "serve", "--port", str(port), "--model", model],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def session(start, model, keystrokes, max_tokens):
    """Starts one server, replays the typing session against it, stops it. Returns one
    (seconds, text, prompt tokens, cached tokens) per keystroke and the peak RSS in KiB."""
    name = os.path.basename(model).removesuffix(".gguf")
    port = free_port()
    proc = start(port)
    try:
        wait_http(port, proc, seconds=START_SECONDS)
        complete(port, name, fim_prompt(""), max_tokens)  # the file was opened
        results = [complete(port, name, fim_prompt(TYPED[:k]), max_tokens) for k in range(1, keystrokes + 1)]
        peak = proc_kib(proc.pid, "VmHWM")
    finally:
        stop(proc)
    return results, peak


def percentile(values, p):
    """The p-th percentile, interpolated between the nearest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def main():
    ap = argparse.ArgumentParser(description="Keystroke FIM completion latency, duet beside llama.cpp's server.")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keystrokes", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["llamacpp", "duet"], help="run one server's half only")
    args = ap.parse_args()
    if not 1 <= args.keystrokes <= len(TYPED):
        ap.error(f"--keystrokes must be between 1 and {len(TYPED)} (the length of the typed text)")
    model = args.model
    if not os.path.isfile(model) and not os.path.isabs(model):
        model = os.path.join(ROOT, model)  # the default, from outside the repository root
    if not os.path.isfile(model):
        sys.exit(f"no model at {args.model} (scripts/fetch-models.sh fetches it)")
    model = os.path.abspath(model)
    if args.only != "llamacpp" and not os.access(DUET, os.X_OK):
        sys.exit(f"no {DUET}; run cargo build --release first")

    runs = {}
    if args.only != "duet":
        python = ensure_llamacpp()
        runs["llama.cpp"] = session(lambda port: start_llamacpp(python, model, port, args.threads),
                                    model, args.keystrokes, args.max_tokens)
    if args.only != "llamacpp":
        runs["duet"] = session(lambda port: start_duet(model, port, args.threads),
                               model, args.keystrokes, args.max_tokens)

    print(f"{os.path.basename(model)}, {args.threads} threads, {args.keystrokes} keystrokes typing "
          f"{TYPED[:args.keystrokes]!r}; FIM /v1/completions, greedy, max_tokens {args.max_tokens}, "
          f"not streamed, end-to-end latency per keystroke; llama.cpp = llama-cpp-python 0.3.36 server\n")
    print("| server | keystrokes | prompt tokens | p50 ms | p90 ms | mean ms | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    p50 = {}
    for who, (results, peak) in runs.items():
        ms = [r[0] * 1000 for r in results]
        tokens = [r[2] for r in results]
        p50[who] = percentile(ms, 50)
        print(f"| {who} | {len(results)} | {min(tokens)}–{max(tokens)} | {p50[who]:.0f} | "
              f"{percentile(ms, 90):.0f} | {statistics.fmean(ms):.0f} | {peak / 1024:.0f} |")
    print()
    if len(p50) == 2:
        print(f"keystroke p50: llama.cpp / duet = {p50['llama.cpp'] / p50['duet']:.2f}x")
    if "duet" in runs:
        cached = [r[3] for r in runs["duet"][0]]
        if all(c is not None for c in cached):
            print(f"duet: mean cached prompt tokens per request = {statistics.fmean(cached):.0f} "
                  f"of {statistics.fmean(r[2] for r in runs['duet'][0]):.0f}")
        else:
            print("duet: no usage.prompt_tokens_details.cached_tokens in its answers")
    if len(runs) == 2:
        same = sum(a[1] == b[1] for a, b in zip(runs["llama.cpp"][0], runs["duet"][0]))
        print(f"completions identical on both servers: {same} of {args.keystrokes} keystrokes")
    for who, (results, _) in runs.items():
        print(f"{who}, last keystroke's completion: {results[-1][1]!r}")


if __name__ == "__main__":
    main()
