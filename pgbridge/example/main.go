// Command example is a one-instance Fabric server with the Postgres bridge,
// for trying it out before `fabric serve --pg-url` is at hand: embedded
// NATS (data in a temporary directory), a WebSocket endpoint on -listen,
// and a bridge LISTENing on -notify and, with -outbox, consuming the outbox.
//
//	psql "$DATABASE_URL" -f pgbridge/example/todos.sql
//	go run ./pgbridge/example -pg-url "$DATABASE_URL"
//	fabric sub --url ws://127.0.0.1:8080/ws todos
//	psql "$DATABASE_URL" -c "INSERT INTO todos (title) VALUES ('buy milk')"
//
// See docs/pgbridge.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/nats-io/nats.go/jetstream"
)

func main() {
	pgURL := flag.String("pg-url", os.Getenv("DATABASE_URL"), "Postgres connection string")
	notify := flag.String("notify", pgbridge.DefaultChannel, "comma-separated channels to LISTEN on (\"\": none)")
	outbox := flag.Bool("outbox", false, "consume the outbox table "+pgbridge.DefaultOutboxTable)
	listen := flag.String("listen", "127.0.0.1:8080", "address of the WebSocket endpoint /ws")
	flag.Parse()
	if err := run(*pgURL, *notify, *outbox, *listen); err != nil {
		fmt.Fprintln(os.Stderr, "example:", err)
		os.Exit(1)
	}
}

func run(pgURL, notify string, outbox bool, listen string) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	dir, err := os.MkdirTemp("", "fabric-pgbridge-example-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ns, err := embed.Start(ctx, embed.Options{DataDir: dir, Logger: quiet})
	if err != nil {
		return err
	}
	defer ns.Shutdown()
	nc, err := ns.Connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	broker := fjs.NewBroker(nc, fjs.BrokerOptions{})
	defer broker.Close()
	node, err := fabric.NewNode(fabric.Config{Broker: broker, Logger: log})
	if err != nil {
		return err
	}
	defer node.Close()
	edge, err := wsedge.New(node, wsedge.Options{})
	if err != nil {
		return err
	}
	leases, err := fjs.NewLeaseStore(ctx, js, fjs.LeaseOptions{})
	if err != nil {
		return err
	}
	var channels []string
	for _, ch := range strings.Split(notify, ",") {
		if ch = strings.TrimSpace(ch); ch != "" {
			channels = append(channels, ch)
		}
	}
	bridge, err := pgbridge.New(node, leases, pgbridge.Options{URL: pgURL, Notify: channels, Outbox: outbox, Logger: log})
	if err != nil {
		return err
	}
	if err := bridge.Start(); err != nil {
		return err
	}
	defer bridge.Close() // before the node and NATS: it releases its leases through NATS

	mux := http.NewServeMux()
	mux.Handle("/ws", edge)
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := bridge.Ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Addr: listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Info("serving", "ws", "ws://"+listen+"/ws", "notify", channels, "outbox", outbox)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = edge.Shutdown(sctx)
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
