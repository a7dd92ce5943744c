#!/usr/bin/env bash
# Relay benchmark: what duet adds when it forwards to a fast local upstream.
#
# The upstream is nginx answering every POST /v1/chat/completions with a fixed OpenAI
# completion; load comes from wrk (both from Debian: apt-get install wrk nginx-light).
# In one run: wrk straight at nginx, then wrk at duet in teacher mode in front of the same
# nginx, same connections and duration; then duet's RSS after 1,000 and after 50,000
# relayed requests.
# usage: scripts/bench-relay.sh [connections=50] [seconds=10]
set -euo pipefail
cd "$(dirname "$0")/.."
conns="${1:-50}"
secs="${2:-10}"
command -v wrk >/dev/null && command -v nginx >/dev/null && command -v ab >/dev/null ||
  apt-get install -y -q wrk nginx-light apache2-utils >/dev/null
[ -x target/release/duet ] || cargo build --release --quiet

work="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port="$(free_port)"
duet_port="$(free_port)"
cleanup() { kill "${duet_pid:-}" "${nginx_pid:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

. scripts/relay-upstream.sh
start_relay_upstream "$work" "$up_port"

RUST_LOG=warn DUET_MODE=teacher TEACHER_BASE_URL="http://127.0.0.1:$up_port/v1" TEACHER_MODEL=fake \
  target/release/duet serve --port "$duet_port" & duet_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$duet_port/health" >/dev/null && break; sleep 0.05; done

load() { # url -> "p50_ms p99_ms rps"
  wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$work/post.lua" "$1/v1/chat/completions" |
    awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /^Requests\/sec/{rps=$2}
         function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         END { printf "%.3f %.3f %.0f\n", ms(p50), ms(p99), rps }'
}
wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "http://127.0.0.1:$duet_port/v1/chat/completions" >/dev/null # warm-up
read -r d50 d99 drps < <(load "http://127.0.0.1:$up_port")
read -r r50 r99 rrps < <(load "http://127.0.0.1:$duet_port")

rss() { awk '/^VmRSS/{print $2/1024}' "/proc/$duet_pid/status"; }
printf '%s' '{"model":"fake","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}' > "$work/body.json"
relay_n() { ab -q -k -n "$1" -c "$conns" -p "$work/body.json" -T application/json \
  "http://127.0.0.1:$duet_port/v1/chat/completions" | grep -E "^(Failed|Non-2xx)" >&2 || true; }
kill "$duet_pid"; wait "$duet_pid" 2>/dev/null || true
RUST_LOG=warn DUET_MODE=teacher TEACHER_BASE_URL="http://127.0.0.1:$up_port/v1" TEACHER_MODEL=fake \
  target/release/duet serve --port "$duet_port" & duet_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$duet_port/health" >/dev/null && break; sleep 0.05; done
relay_n 1000;  rss1k="$(rss)"
relay_n 49000; rss50k="$(rss)"

echo "wrk -t2 -c$conns -d${secs}s, POST /v1/chat/completions (non-streamed), $(nproc) CPUs shared by wrk, nginx and duet"
echo
echo "| path | p50 ms | p99 ms | requests/s |"
echo "|---|---|---|---|"
echo "| straight to the upstream (nginx) | $d50 | $d99 | $drps |"
echo "| through duet (teacher mode) | $r50 | $r99 | $rrps |"
awk -v d50="$d50" -v r50="$r50" -v d99="$d99" -v r99="$r99" -v d="$drps" -v r="$rrps" 'BEGIN {
  printf "| duet adds / relayed share | +%.3f | +%.3f | %.0f%% |\n", r50 - d50, r99 - d99, 100 * r / d }'
echo
awk -v a="$rss1k" -v b="$rss50k" 'BEGIN { printf "duet RSS after 1,000 relayed requests: %.1f MB; after 50,000: %.1f MB (%+.1f%%)\n", a, b, 100 * (b - a) / a }'
