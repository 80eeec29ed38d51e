#!/usr/bin/env bash
# bench/side-by-side.sh: Fabric, Centrifugo and NATS's WebSocket listener
# under the same load-tool scenarios, alternating systems, in one session;
# then the tables of docs/benchmarks.md ("Side by side"). Not part of
# `make test`. Loopback only; every run is bounded and stops by itself.
#
#   bench/side-by-side.sh [OUT_DIR]        # default: ./side-by-side-<date>
#
# Environment:
#   ROUNDS=3          runs of each system per scenario (the order of the
#                     systems rotates from round to round)
#   SCENARIOS="broadcast fanout-http fanout-rpc idle churn"
#   TARGETS="fabric centrifugo nats-ws"
#   MAX_LOAD=1        wait (up to WAIT_LOAD seconds, default 600) for the
#                     1-minute load average to fall under this before each
#                     run; the load at each start is in its result
#   PAUSE=5           seconds between runs
#   CENTRIFUGO_POOL=1 also run idle on Centrifugo with
#                     websocket.use_write_buffer_pool (its memory option)
#   BROADCAST_PUBLISHERS=16  concurrent publishers in broadcast, for every
#                     target (Centrifugo's HTTP publish answers after its
#                     fan-out: one sequential publisher would cap its rate
#                     at one fan-out at a time)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/side-by-side-$(date -u +%Y%m%d-%H%M)}
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"broadcast fanout-http fanout-rpc idle churn"}
TARGETS=(${TARGETS:-fabric centrifugo nats-ws})
MAX_LOAD=${MAX_LOAD:-1}
WAIT_LOAD=${WAIT_LOAD:-600}
PAUSE=${PAUSE:-5}
CENTRIFUGO_POOL=${CENTRIFUGO_POOL:-1}
BROADCAST_PUBLISHERS=${BROADCAST_PUBLISHERS:-16}
PEERS_DIR=$("$ROOT/bench/peers.sh" dir)

mkdir -p "$OUT"
"$ROOT/bench/peers.sh" install
(cd "$ROOT" && go build -o "$OUT/fabric" ./cmd/fabric && go build -o "$OUT/fabric-bench" ./cmd/fabric-bench)

binary() {
	case "$1" in
	fabric) echo "$OUT/fabric" ;;
	centrifugo) echo "$PEERS_DIR/bin/centrifugo" ;;
	nats-ws) echo "$PEERS_DIR/bin/natsws" ;;
	esac
}

wait_quiet() {
	local waited=0
	while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg; do
		if [ "$waited" -ge "$WAIT_LOAD" ]; then
			echo "load average still $(cut -d' ' -f1-3 /proc/loadavg) after ${WAIT_LOAD}s: running anyway (provisional)" >&2
			return
		fi
		sleep 10
		waited=$((waited + 10))
	done
}

run() { # scenario-name target round
	local name=$1 target=$2 round=$3 args=()
	case "$name" in
	broadcast) args=(--scenario broadcast --publishers "$BROADCAST_PUBLISHERS") ;;
	fanout-http)
		args=(--scenario fanout-many-topics)
		[ "$target" = nats-ws ] && args+=(--via nats) || args+=(--via http)
		;;
	fanout-rpc) args=(--scenario fanout-many-topics --via rpc) ;;
	idle) args=(--scenario idle) ;;
	idle-pool) args=(--scenario idle --centrifugo-write-buffer-pool) ;;
	churn) args=(--scenario churn) ;;
	esac
	wait_quiet
	local out="$OUT/$name-$target-$round.json"
	echo "== $name on $target, round $round (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
	"$OUT/fabric-bench" --target "$target" --spawn "$(binary "$target")" "${args[@]}" --json --quiet >"$out.tmp" &&
		mv "$out.tmp" "$out" || echo "   failed: see $out.tmp" >&2
	sleep "$PAUSE"
}

for round in $(seq "$ROUNDS"); do
	for scenario in $SCENARIOS; do
		n=${#TARGETS[@]}
		for k in $(seq 0 $((n - 1))); do
			target=${TARGETS[$(((k + round - 1) % n))]}
			run "$scenario" "$target" "$round"
			if [ "$scenario" = idle ] && [ "$target" = centrifugo ] && [ "$CENTRIFUGO_POOL" = 1 ]; then
				run idle-pool centrifugo "$round"
			fi
		done
	done
done

"$OUT/fabric-bench" table "$OUT"/*.json | tee "$OUT/tables.md"
echo "results in $OUT" >&2
