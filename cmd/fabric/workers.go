package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/server"
	"github.com/fabricrt/fabric/workers"
	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"
)

// Worker mode (`fabric serve --workers N`): this process becomes the
// primary (the embedded NATS server, one SO_REUSEPORT socket per worker
// slot, the supervisor of package workers) and runs N copies of itself as
// workers: `fabric serve --worker <the same arguments>`, each a full server
// on the primary's NATS (over loopback, with a random token) serving the
// slot's inherited socket. See docs/cluster.md.

// gWorkers is the help section of the worker settings.
const gWorkers = "Worker processes (docs/cluster.md#worker-mode)"

// workerFlag marks a worker's command line (first argument after serve);
// it is not in the settings table: only a primary passes it.
const workerFlag = "--worker"

// workerSettings are the worker mode's settings.
type workerSettings struct {
	Count          int
	HealthInterval time.Duration
	HealthTimeout  time.Duration
	DrainGrace     time.Duration
}

func defaultWorkerSettings() workerSettings {
	return workerSettings{HealthInterval: workers.DefaultHealthInterval, HealthTimeout: workers.DefaultHealthTimeout,
		DrainGrace: 500 * time.Millisecond}
}

// workerCountValue is --workers: a count, or no value (true, auto) for one
// per CPU.
type workerCountValue struct{ p *int }

func workerCount(f func(c *serveConfig) *int) func(*serveConfig) value {
	return func(c *serveConfig) value { return workerCountValue{f(c)} }
}

func (v workerCountValue) String() string   { return strconv.Itoa(*v.p) }
func (v workerCountValue) Type() string     { return "count" }
func (v workerCountValue) IsBoolFlag() bool { return true } // --workers alone
func (v workerCountValue) Set(s string) error {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "auto", "":
		*v.p = runtime.NumCPU()
		return nil
	case "false":
		*v.p = 0
		return nil
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 0 {
		return fmt.Errorf("%q: want a number of workers, or no value for one per CPU", s)
	}
	*v.p = n
	return nil
}

// joinWorkersArg turns "--workers N" into "--workers=N" (a flag that may go
// without a value takes its value after '=' only).
func joinWorkersArg(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		if (a == "--workers" || a == "-workers") && i+1 < len(args) {
			if _, err := strconv.Atoi(args[i+1]); err == nil {
				out = append(out, a+"="+args[i+1])
				i++
				continue
			}
		}
		out = append(out, a)
	}
	return out
}

// workerMode runs the worker mode's roles: a worker (the hidden first
// argument), or the primary (--workers N with N > 0). It reports false for
// a plain `fabric serve`, after rewriting args for it.
func workerMode(args *[]string, stdout, stderr io.Writer) (int, bool) {
	a := joinWorkersArg(*args)
	*args = a
	if len(a) > 0 && a[0] == workerFlag {
		return runWorker(a[1:], stderr), true
	}
	cfg, _, err := parseServe(a)
	if err != nil || cfg.Workers.Count <= 0 {
		return 0, false // serveCmd reports what is wrong, or serves
	}
	return runPrimary(cfg, a, stdout, stderr), true
}

// workerInit is what a worker learns from its primary (workers.Init.Data).
type workerInit struct {
	// NATSURL and Token reach the primary's embedded NATS server; empty
	// when the workers use an external NATS or Redis themselves.
	NATSURL string `json:"nats_url,omitempty"`
	Token   string `json:"token,omitempty"`
	// Admin is true when the worker inherits an admin listener too.
	Admin bool `json:"admin,omitempty"`
}

// runPrimary runs the primary until SIGTERM or SIGINT (SIGHUP rolls the
// workers).
func runPrimary(cfg *serveConfig, args []string, stdout, stderr io.Writer) int {
	log, err := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		fmt.Fprintf(stderr, "fabric serve: %v\n", err)
		return 2
	}
	fail := func(msg string, err error) int {
		log.Error(msg, "err", err)
		return 1
	}
	if cfg.Backend == server.BackendMemory {
		fmt.Fprintln(stderr, "fabric serve: --workers needs a backend the workers share (nats or redis), not memory")
		return 2
	}
	if err := cfg.Options.Validate(); err != nil {
		fmt.Fprintf(stderr, "fabric serve: %v\n", err)
		return 2
	}
	self, err := selfPath()
	if err != nil {
		return fail("worker mode: cannot find this binary", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	n := cfg.Workers.Count
	log = log.With("role", "primary")

	// The embedded NATS server, unless the workers use another backend.
	var ns *embed.Server
	init := workerInit{Admin: cfg.HTTP.AdminListen != ""}
	if cfg.Backend == server.BackendNATS && cfg.NATS.URL == "" {
		eo, err := cfg.Options.EmbedConfig()
		if err != nil {
			return fail("worker mode: embedded NATS options", err)
		}
		eo.Logger = log
		if eo.ClientListen == "" {
			// A private client port for the workers: loopback, a random
			// token, never advertised to the cluster.
			eo.ClientListen, eo.Token, eo.NoAdvertise = "127.0.0.1:0", randomToken(), true
		}
		if ns, err = embed.Start(ctx, eo); err != nil {
			return fail("worker mode: embedded NATS", err)
		}
		defer ns.Shutdown()
		init.NATSURL, init.Token = loopbackURL(ns.NATS().Addr()), eo.Token
		log.Info("embedded NATS started", "name", ns.Name(), "data", eo.DataDir, "cluster", ns.ClusterURL(),
			"gateway", ns.GatewayURL(), "leaf", ns.LeafURL())
	}
	files, addr, err := slotSockets(ctx, cfg, n)
	if err != nil {
		return fail("worker mode: listen", err)
	}
	initJSON, _ := json.Marshal(init)
	sup, err := workers.New(workers.Options{
		Workers: n,
		Files:   files,
		Command: func(int) (*exec.Cmd, error) {
			cmd := exec.Command(self, append([]string{"serve", workerFlag}, args...)...)
			cmd.Stdout, cmd.Stderr = stdout, stderr
			return cmd, nil
		},
		Init: func(int) json.RawMessage { return initJSON },
		PrimaryState: func() json.RawMessage {
			if ns == nil {
				return nil
			}
			b, _ := json.Marshal(ns.Status())
			return b
		},
		HealthInterval: cfg.Workers.HealthInterval,
		HealthTimeout:  cfg.Workers.HealthTimeout,
		StopTimeout:    cfg.ShutdownTimeout + cfg.Workers.DrainGrace + 5*time.Second,
		Logger:         log,
	})
	if err != nil {
		for _, fs := range files {
			for _, f := range fs {
				f.Close()
			}
		}
		return fail("worker mode", err)
	}
	log.Info("fabric started in worker mode", "version", versionString(), "workers", n, "http", addr, "binary", self)

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var wg sync.WaitGroup
	defer wg.Wait()
	rollCtx, endRolls := context.WithCancel(ctx)
	defer endRolls()
	wg.Go(func() {
		for {
			select {
			case <-rollCtx.Done():
				return
			case <-hup:
				log.Info("SIGHUP: replacing the workers one by one")
				start := time.Now()
				if err := sup.Roll(rollCtx); err != nil {
					log.Error("rolling restart stopped", "err", err)
				} else {
					log.Info("rolling restart done", "took", time.Since(start).Round(time.Millisecond))
				}
			}
		}
	})
	err = sup.Run(ctx)
	endRolls()
	if err != nil {
		return fail("worker mode: giving up", err)
	}
	log.Info("stopped")
	return 0
}

// selfPath is this binary's absolute path as it was started: a rolling
// restart runs whatever is at that path then (an upgrade).
func selfPath() (string, error) {
	p := os.Args[0]
	if !strings.Contains(p, string(os.PathSeparator)) {
		lp, err := exec.LookPath(p)
		if err != nil {
			return os.Executable()
		}
		p = lp
	}
	return filepath.Abs(p)
}

func randomToken() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// loopbackURL is a NATS URL for addr reached from this machine.
func loopbackURL(addr net.Addr) string {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return "nats://" + addr.String()
	}
	host := ta.IP.String()
	if ta.IP == nil || ta.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "nats://" + net.JoinHostPort(host, strconv.Itoa(ta.Port))
}

// slotSockets binds, for each worker slot, a SO_REUSEPORT socket on the
// HTTP address (and one on the admin address when there is one): the
// kernel spreads connections over the slots. The first socket fixes the
// port when the address asks for any (":0").
func slotSockets(ctx context.Context, cfg *serveConfig, n int) ([][]*os.File, string, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	addrs := []string{cfg.HTTP.Listen}
	if cfg.HTTP.AdminListen != "" {
		addrs = append(addrs, cfg.HTTP.AdminListen)
	}
	files := make([][]*os.File, n)
	closeAll := func() {
		for _, fs := range files {
			for _, f := range fs {
				f.Close()
			}
		}
	}
	for slot := range n {
		for i, a := range addrs {
			ln, err := lc.Listen(ctx, "tcp", a)
			if err != nil {
				closeAll()
				return nil, "", fmt.Errorf("listen %s: %w", a, err)
			}
			addrs[i] = ln.Addr().String()
			f, err := ln.(*net.TCPListener).File()
			ln.Close() // f keeps the socket; the primary never accepts on it
			if err != nil {
				closeAll()
				return nil, "", fmt.Errorf("listen %s: %w", a, err)
			}
			files[slot] = append(files[slot], f)
		}
	}
	return files, addrs[0], nil
}

// runWorker is one worker: a full server on the primary's NATS, serving
// the inherited sockets, answering the primary's health checks.
func runWorker(args []string, stderr io.Writer) int {
	cfg, _, err := parseServe(args)
	if err != nil {
		fmt.Fprintf(stderr, "fabric serve (worker): %v\n", err)
		return 2
	}
	log, err := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		fmt.Fprintf(stderr, "fabric serve (worker): %v\n", err)
		return 2
	}
	w, err := workers.Attach(30 * time.Second)
	if err != nil {
		log.Error("worker: no primary", "err", err)
		return 1
	}
	in := w.Init()
	log = log.With("role", "worker", "slot", in.Slot, "pid", os.Getpid())
	var init workerInit
	if len(in.Data) > 0 {
		if err := json.Unmarshal(in.Data, &init); err != nil {
			log.Error("worker: bad init message", "err", err)
			return 1
		}
	}
	// Terminal signals go to the primary (workers have their own process
	// group); SIGHUP is the primary's to act on.
	signal.Ignore(syscall.SIGHUP)
	sigCtx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	opts := cfg.Options
	opts.Logger = log
	lns := w.Listeners()
	if len(lns) == 0 {
		log.Error("worker: no listener inherited")
		return 1
	}
	opts.HTTP.Listener = lns[0]
	if init.Admin && len(lns) > 1 {
		opts.HTTP.AdminListener = lns[1]
	}
	var nc *nats.Conn
	if init.NATSURL != "" {
		nc, err = nats.Connect(init.NATSURL, nats.Token(init.Token), nats.Name(fmt.Sprintf("fabric-worker-%d", in.Slot)),
			nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond), nats.IgnoreDiscoveredServers())
		if err != nil {
			log.Error("worker: connect to the primary's NATS", "err", err)
			return 1
		}
		opts.NATS.Conn, opts.NATS.URL = nc, ""
		opts.NATSStatus = func() (embed.Status, bool) {
			var st embed.Status
			p := w.Primary()
			return st, len(p) > 0 && json.Unmarshal(p, &st) == nil
		}
	}

	// Draining: stop accepting first (the socket stays with the other
	// holders), give the requests already accepted DrainGrace to reach
	// their handlers, then shut the server down (1001 to every WebSocket).
	runCtx, endRun := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		endRun()
		w.Close()
		wg.Wait()
	}()
	wg.Go(func() {
		select {
		case <-sigCtx.Done():
		case <-w.Done():
			log.Warn("worker: the primary is gone: draining")
		case <-runCtx.Done():
			return
		}
		w.StopAccepting()
		t := time.NewTimer(cfg.Workers.DrainGrace)
		defer t.Stop()
		select {
		case <-t.C:
		case <-runCtx.Done():
		}
		endRun()
	})

	var srvp atomic.Pointer[server.Server]
	wg.Go(func() {
		_ = w.Serve(func() workers.Health {
			srv := srvp.Load()
			if srv == nil {
				return workers.Health{Status: "starting"}
			}
			ctx, cancel := context.WithTimeout(runCtx, 5*time.Second)
			defer cancel()
			err := srv.Ready(ctx)
			h := workers.Health{Ready: err == nil, Connections: srv.Node().Connections()}
			if err != nil {
				h.Status = err.Error()
			} else {
				w.StartAccepting() // a replacement accepts once ready
			}
			return h
		})
	})
	srv, err := server.New(runCtx, opts)
	if err != nil {
		if nc != nil {
			nc.Close()
		}
		if runCtx.Err() != nil {
			return 0
		}
		log.Error("worker: start failed", "err", err)
		return 1
	}
	srvp.Store(srv)
	runErr := srv.Run(runCtx)
	if nc != nil {
		drain(nc)
	}
	w.Close()
	switch {
	case runErr != nil && runCtx.Err() == nil:
		log.Error("worker: server failed", "err", runErr)
		return 1
	case runErr != nil:
		log.Warn("worker: shutdown incomplete", "err", runErr)
	}
	log.Info("worker: stopped")
	return 0
}

// drain drains nc within 5s.
func drain(nc *nats.Conn) {
	done := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(done) })
	if err := nc.Drain(); err != nil {
		nc.Close()
		return
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		nc.Close()
	}
}
