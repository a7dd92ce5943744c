#!/usr/bin/env bash
# What shared rate limits cost per request: duet in teacher mode relaying to a fast local
# upstream (nginx answering a fixed completion), with its limits counted in the process
# (limits.backend = "local") and then in a local Redis ("redis"), same limits (high enough
# that nothing is refused, so every request runs the whole check), same load, one run.
# Load from wrk, one connection (latency) and then many (throughput). Debian packages:
# wrk, nginx-light, redis-server.
# usage: scripts/bench-limits.sh [connections=32] [seconds=10]
set -euo pipefail
cd "$(dirname "$0")/.."
conns="${1:-32}"
secs="${2:-10}"
command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null
scripts/install-scale-out.sh
[ -x target/release/duet ] || cargo build --release --quiet

work="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port="$(free_port)"; redis_port="$(free_port)"; duet_port="$(free_port)"
cleanup() { kill "${duet_pid:-}" "${nginx_pid:-}" "${redis_pid:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

. scripts/relay-upstream.sh
start_relay_upstream "$work" "$up_port"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & redis_pid=$!

start_duet() { # backend
  RUST_LOG=warn DUET_MODE=teacher TEACHER_BASE_URL="http://127.0.0.1:$up_port/v1" TEACHER_MODEL=fake \
    DUET_LIMITS_BACKEND="$1" DUET_LIMITS_REDIS_URL="redis://127.0.0.1:$redis_port/" \
    DUET_LIMITS_REQUESTS_PER_MINUTE=1000000000 DUET_LIMITS_TOKENS_PER_MINUTE=1000000000 \
    DUET_LIMITS_GLOBAL_REQUESTS_PER_MINUTE=1000000000 \
    target/release/duet serve --port "$duet_port" & duet_pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$duet_port/health" >/dev/null && break; sleep 0.05; done
  wrk -t1 -c4 -d2s -s "$work/post.lua" "http://127.0.0.1:$duet_port/v1/chat/completions" >/dev/null # warm-up
}
stop_duet() { kill "$duet_pid"; wait "$duet_pid" 2>/dev/null || true; }
load() { # connections -> "p50_ms p99_ms rps"
  wrk -t1 -c"$1" -d"${secs}s" --latency -s "$work/post.lua" "http://127.0.0.1:$duet_port/v1/chat/completions" |
    awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /^Requests\/sec/{rps=$2}
         function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         END { printf "%.3f %.3f %.0f\n", ms(p50), ms(p99), rps }'
}

start_duet local
read -r l1_50 l1_99 l1_rps < <(load 1)
read -r ln_50 ln_99 ln_rps < <(load "$conns")
stop_duet
start_duet redis
read -r r1_50 r1_99 r1_rps < <(load 1)
read -r rn_50 rn_99 rn_rps < <(load "$conns")
failures="$(curl -s "http://127.0.0.1:$duet_port/metrics" | awk '/^duet_limits_redis_failures_total/{print $2}')"
keys="$(redis-cli -p "$redis_port" dbsize)"
stop_duet

echo "duet in teacher mode before a local nginx upstream; 3 limits per request (client requests,"
echo "global requests, client tokens); wrk -t1, ${secs}s per row; $(nproc) CPUs shared by wrk, nginx, Redis and duet"
echo
echo "| limits.backend | connections | p50 ms | p99 ms | requests/s |"
echo "|---|---|---|---|---|"
echo "| local | 1 | $l1_50 | $l1_99 | $l1_rps |"
echo "| redis | 1 | $r1_50 | $r1_99 | $r1_rps |"
echo "| local | $conns | $ln_50 | $ln_99 | $ln_rps |"
echo "| redis | $conns | $rn_50 | $rn_99 | $rn_rps |"
echo
awk -v a="$l1_50" -v b="$r1_50" -v c="$ln_50" -v d="$rn_50" 'BEGIN {
  printf "Redis adds at p50: %+.3f ms alone, %+.3f ms under %s connections\n", b - a, d - c, "'"$conns"'" }'
echo "Redis checks that failed: ${failures:-?}; buckets in Redis: $keys"
