#!/usr/bin/env bash
# bench/100k.sh: 100,000 subscribed WebSocket connections on one machine
# (docs/benchmarks.md, "100,000 connections"). Not part of `make test`.
#
#   bench/100k.sh [CONNS] [OUT_DIR]      # default 100000, ./100k-<date>
#
# The server runs in worker mode (fabric serve --workers $WORKERS, spawned
# and stopped by fabric-bench --spawn --server-workers): each process may
# hold 20,000 open files here, so 100,000 sockets need at least 6 workers
# (the kernel spreads connections over their SO_REUSEPORT sockets). The
# load tool runs $PROCS worker processes binding source addresses across
# 127.0.0.0/8. One broadcast scenario: fill, then 1 publish/s to all for
# 10 s; the result has the handshake rate while filling, deliveries and
# missing ones, the server's RSS summed over the primary and its workers
# (and per connection over the baseline), and the kernel's TCP memory from
# /proc/net/sockstat (the whole machine's: both ends of every loopback
# connection are on it). Every run is bounded; fabric-bench stops what it
# started.
#
# Environment: WORKERS=6 PROCS=8 RATE=1 DURATION=10s; GOGC reaches the
# server (and the tool) through the environment: GOGC=20 held 100,000 at
# 4.8 KiB per connection summed over the server's 7 processes, Go's
# default 6.7-6.9 KiB (docs/benchmarks.md). A worker refuses upgrades past
# 90% of its open-file limit (18,000 here) with a 503: with WORKERS=4 the
# run stops at 72,000.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=${1:-100000}
OUT=${2:-$ROOT/100k-$(date -u +%Y%m%d-%H%M)}
WORKERS=${WORKERS:-6}
PROCS=${PROCS:-8}
RATE=${RATE:-1}
DURATION=${DURATION:-10s}

mkdir -p "$OUT"
(cd "$ROOT" && go build -o "$OUT/fabric" ./cmd/fabric && go build -o "$OUT/fabric-bench" ./cmd/fabric-bench)
echo "== $CONNS connections, $WORKERS server workers, $PROCS load processes (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
cat /proc/net/sockstat >"$OUT/sockstat-before.txt"
"$OUT/fabric-bench" --scenario broadcast --conns "$CONNS" --rate "$RATE" --publishers 1 --duration "$DURATION" \
	--spawn "$OUT/fabric" --server-workers "$WORKERS" --procs "$PROCS" --floor=false --json \
	>"$OUT/broadcast-$CONNS.json"
cat /proc/net/sockstat >"$OUT/sockstat-after.txt"
cat "$OUT/broadcast-$CONNS.json"
