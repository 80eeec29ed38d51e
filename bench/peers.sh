#!/usr/bin/env bash
# bench/peers.sh: the peers fabric-bench compares Fabric with (docs/benchmarks.md,
# "Side by side"). Nothing here runs in `make test`.
#
#   bench/peers.sh install            # go install centrifugo v6.9.1 and build bench/natsws into $PEERS_DIR/bin
#   bench/peers.sh config             # write $PEERS_DIR/centrifugo.json (fabric-bench --spawn writes its own, the same)
#   bench/peers.sh start centrifugo   # start it in the background (pid in $PEERS_DIR/centrifugo.pid)
#   bench/peers.sh start nats-ws      # nats-server (the module's version) with a WebSocket listener
#   bench/peers.sh stop  centrifugo|nats-ws|all
#   bench/peers.sh status
#   bench/peers.sh pid centrifugo|nats-ws   # for fabric-bench --server-pid
#   bench/peers.sh dir                # $PEERS_DIR
#
# fabric-bench starts and stops the peers itself with --spawn:
#   fabric-bench --target centrifugo --spawn "$(bench/peers.sh dir)/bin/centrifugo"
#   fabric-bench --target nats-ws --spawn "$(bench/peers.sh dir)/bin/natsws"
# or, against peers started here:
#   fabric-bench --target centrifugo --server-pid "$(bench/peers.sh pid centrifugo)"
#   fabric-bench --target nats-ws --publish-url nats://127.0.0.1:18422 --server-pid "$(bench/peers.sh pid nats-ws)"
#
# Everything listens on 127.0.0.1 only. Ports: CENTRIFUGO_PORT (default 18000),
# NATS_WS_PORT (default 18222; its client port NATS_PORT, default 18422).
set -euo pipefail

CENTRIFUGO_VERSION=v6.9.1
PEERS_DIR=${PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fabric-bench-peers}
CENTRIFUGO_PORT=${CENTRIFUGO_PORT:-18000}
NATS_WS_PORT=${NATS_WS_PORT:-18222}
NATS_PORT=${NATS_PORT:-18422}
# The API key fabric-bench sends with --target centrifugo (--api-key).
CENTRIFUGO_API_KEY=${CENTRIFUGO_API_KEY:-fabric-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$PEERS_DIR"

install() {
	if [ ! -x "$PEERS_DIR/bin/centrifugo" ]; then
		echo "installing centrifugo $CENTRIFUGO_VERSION into $PEERS_DIR/bin" >&2
		# pkg@version builds outside Fabric's module, with Centrifugo's own
		# go.mod (its release build sets the version it prints by ldflags:
		# `go version -m` below shows the module version instead).
		(cd "$PEERS_DIR" && GOBIN="$PEERS_DIR/bin" GOFLAGS= go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION")
	fi
	go version -m "$PEERS_DIR/bin/centrifugo" | grep -m1 $'\tmod\t' >&2 || true
	echo "building bench/natsws into $PEERS_DIR/bin" >&2
	(cd "$ROOT" && go build -o "$PEERS_DIR/bin/natsws" ./bench/natsws)
}

config() {
	# The configuration fabric-bench --target centrifugo --spawn writes
	# (cmd/fabric-bench/peers.go, centrifugoConfig), as Centrifugo's docs
	# recommend for one node: insecure client mode (no JWT: clients
	# connect, subscribe and publish freely, as the load tool's clients do
	# on Fabric with --client-publish bench:*), the memory engine, the HTTP
	# API with a key, the "bench" namespace (the topics' "bench:" prefix)
	# without history, recovery or presence, like Fabric's plain topics.
	# CENTRIFUGO_POOL=true sets websocket.use_write_buffer_pool (its memory
	# option for connections that write little).
	cat > "$PEERS_DIR/centrifugo.json" <<JSON
{
  "log": {"level": "error"},
  "http_server": {"address": "127.0.0.1", "port": $CENTRIFUGO_PORT},
  "client": {"insecure": true, "allowed_origins": ["*"]},
  "engine": {"type": "memory"},
  "http_api": {"key": "$CENTRIFUGO_API_KEY"},
  "channel": {
    "namespaces": [
      {"name": "bench", "allow_subscribe_for_client": true, "allow_publish_for_client": true}
    ]
  },
  "websocket": {"use_write_buffer_pool": ${CENTRIFUGO_POOL:-false}},
  "health": {"enabled": true}
}
JSON
	echo "$PEERS_DIR/centrifugo.json"
}

start() {
	case "${1:-}" in
	centrifugo)
		[ -x "$PEERS_DIR/bin/centrifugo" ] || install
		[ -f "$PEERS_DIR/centrifugo.json" ] || config >/dev/null
		stop centrifugo
		# GOMAXPROCS is the machine's: the same as Fabric gets.
		"$PEERS_DIR/bin/centrifugo" --config "$PEERS_DIR/centrifugo.json" >"$PEERS_DIR/centrifugo.log" 2>&1 &
		echo $! >"$PEERS_DIR/centrifugo.pid"
		wait_http "http://127.0.0.1:$CENTRIFUGO_PORT/health"
		echo "centrifugo pid $(cat "$PEERS_DIR/centrifugo.pid"): ws://127.0.0.1:$CENTRIFUGO_PORT/connection/websocket, api http://127.0.0.1:$CENTRIFUGO_PORT/api"
		;;
	nats-ws)
		[ -x "$PEERS_DIR/bin/natsws" ] || install
		stop nats-ws
		"$PEERS_DIR/bin/natsws" --ws "127.0.0.1:$NATS_WS_PORT" --client "127.0.0.1:$NATS_PORT" >"$PEERS_DIR/nats-ws.log" 2>&1 &
		echo $! >"$PEERS_DIR/nats-ws.pid"
		wait_tcp 127.0.0.1 "$NATS_WS_PORT"
		echo "nats-ws pid $(cat "$PEERS_DIR/nats-ws.pid"): ws://127.0.0.1:$NATS_WS_PORT, nats://127.0.0.1:$NATS_PORT"
		;;
	*) echo "start centrifugo|nats-ws" >&2; exit 2 ;;
	esac
}

stop() {
	local names=("$1")
	[ "$1" = all ] && names=(centrifugo nats-ws)
	for n in "${names[@]}"; do
		local f="$PEERS_DIR/$n.pid"
		if [ -f "$f" ]; then
			local pid
			pid=$(cat "$f")
			if kill -0 "$pid" 2>/dev/null; then
				kill "$pid"
				for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			fi
			rm -f "$f"
		fi
	done
}

status() {
	for n in centrifugo nats-ws; do
		local f="$PEERS_DIR/$n.pid"
		if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
			echo "$n running, pid $(cat "$f")"
		else
			echo "$n stopped"
		fi
	done
}

wait_http() {
	for _ in $(seq 100); do
		curl -fsS "$1" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "$1 not ready" >&2
	return 1
}

wait_tcp() {
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "$1:$2 not listening" >&2
	return 1
}

case "${1:-}" in
install) install ;;
config) config ;;
start) start "${2:-}" ;;
stop) stop "${2:-all}" ;;
status) status ;;
pid) cat "$PEERS_DIR/${2:?centrifugo|nats-ws}.pid" ;;
dir) echo "$PEERS_DIR" ;;
*) sed -n '2,14p' "$0"; exit 2 ;;
esac
