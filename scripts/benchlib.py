"""Helpers the benchmark scripts share: a free loopback port, a process's memory from
/proc, waiting for a server to answer, and one streamed chat request as a client sees it."""

import http.client
import json
import socket
import sys
import time


def free_port():
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kib(pid, field):
    """A /proc/<pid>/status field in KiB, such as VmRSS or VmHWM (0 when absent)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def wait_http(port, proc, path="/v1/models", seconds=60):
    """Waits until GET path answers 200; exits if `proc` dies first or time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server on port {port} exited during start-up")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"the server on port {port} did not start")


def stream_chat(port, body):
    """POSTs `body` (a dict with "stream": true) to /v1/chat/completions and reads the whole
    stream. Returns the start time, the arrival time of every chunk with content, the text,
    and the usage chunk (None unless asked for). Exits on a non-200 answer."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = c.getresponse()
    if resp.status != 200:
        sys.exit(f"the server on port {port} answered {resp.status}: {resp.read()[:300]!r}")
    stamps, text, usage = [], [], None
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
                text.append(choice["delta"]["content"])
    return start, stamps, "".join(text), usage
