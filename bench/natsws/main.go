// Command natsws runs a bare NATS server (the nats-server module Fabric
// embeds, same version) with a WebSocket listener, for fabric-bench's
// --target nats-ws: the floor of what a NATS-based fan-out does without
// application semantics. Core NATS only: no JetStream, no authentication,
// no TLS; both listeners on loopback by default.
//
//	natsws --ws 127.0.0.1:18222 --client 127.0.0.1:18422
//
// It stops on SIGINT or SIGTERM.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

func main() {
	wsAddr := flag.String("ws", "127.0.0.1:18222", "WebSocket listener (host:port)")
	clientAddr := flag.String("client", "127.0.0.1:18422", "NATS client listener (host:port), for publishers")
	maxPending := flag.Int64("max-pending", 64<<20, "bytes a client may fall behind before it is a slow consumer (the server default)")
	flag.Parse()
	if err := run(*wsAddr, *clientAddr, *maxPending); err != nil {
		fmt.Fprintln(os.Stderr, "natsws:", err)
		os.Exit(1)
	}
}

func run(wsAddr, clientAddr string, maxPending int64) error {
	wh, wp, err := splitHostPort(wsAddr)
	if err != nil {
		return err
	}
	ch, cp, err := splitHostPort(clientAddr)
	if err != nil {
		return err
	}
	opts := &server.Options{
		ServerName: "natsws",
		Host:       ch,
		Port:       cp,
		NoSigs:     true,
		MaxPending: maxPending,
		// The load tool opens tens of thousands of connections.
		MaxConn: 1 << 20,
	}
	opts.Websocket.Host = wh
	opts.Websocket.Port = wp
	opts.Websocket.NoTLS = true
	ns, err := server.NewServer(opts)
	if err != nil {
		return err
	}
	ns.ConfigureLogger()
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		return fmt.Errorf("not ready after 30s")
	}
	fmt.Fprintf(os.Stderr, "natsws: websocket ws://%s, clients nats://%s\n", wsAddr, clientAddr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	ns.Shutdown()
	ns.WaitForShutdown()
	return nil
}

func splitHostPort(a string) (string, int, error) {
	h, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, fmt.Errorf("port of %q: %w", a, err)
	}
	return h, n, nil
}
