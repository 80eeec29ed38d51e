package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/fabricrt/fabric/server"
)

const serveHeader = `Usage: fabric serve [flags]

Runs the server: embedded NATS with JetStream (or an external NATS, or the
in-memory backend), the WebSocket endpoint and the HTTP API.

Every flag has an environment variable (env) and a config file key (key,
for --config FILE, a YAML file; docs/config.md). A flag wins over its
environment variable, which wins over the config file, which wins over the
default. Topic policies (persistence, presence, client publish per topic
pattern) live in the config file's topics table; --replay, --presence and
--client-publish add policies.`

func serveUsage(w io.Writer) {
	serveFlags(newServeConfig()).usage(w, serveHeader)
}

func serveCmd(args []string, stdout, stderr io.Writer) int {
	if code, done := workerMode(&args, stdout, stderr); done { // workers.go: --workers
		return code
	}
	cfg, fs, err := parseServe(args)
	if err != nil {
		if isHelp(err) {
			fs.usage(stdout, serveHeader)
			return 0
		}
		fmt.Fprintf(stderr, "fabric serve: %v\n", err)
		if errors.As(err, new(usageError)) {
			fmt.Fprintln(stderr)
			fs.usage(stderr, serveHeader)
		}
		return 2
	}
	log, err := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		fmt.Fprintf(stderr, "fabric serve: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	opts := cfg.Options
	opts.Logger = log
	srv, err := server.New(ctx, opts)
	if err != nil {
		log.Error("start failed", "err", err)
		return 1
	}
	log.Info("fabric started", "version", versionString(), "config", cfg.ConfigFile)
	reloadOnHUP(srv)
	if err := srv.Run(ctx); err != nil {
		if ctx.Err() == nil {
			log.Error("server failed", "err", err)
			return 1
		}
		log.Warn("shutdown incomplete", "err", err)
	}
	log.Info("stopped")
	return 0
}

// reloadOnHUP makes SIGHUP re-read what may change while the server runs
// (Server.Reload: the auth key files and JWK Set) until it stops. Worker
// mode's primary acts on SIGHUP itself (it replaces the workers).
func reloadOnHUP(srv *server.Server) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-hup:
				_ = srv.Reload() // it logs the outcome
			case <-srv.Done():
				return
			}
		}
	}()
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}
