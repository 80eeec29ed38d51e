// Package server is `fabric serve` as a library. New builds everything the
// binary runs from Options: the backend (embedded NATS with JetStream, an
// external NATS, or the single-process in-memory backend), the history,
// presence, rate limits and cluster view on it, the Node, the WebSocket and
// SSE transports, and the HTTP endpoints (/ws, /events, /api/publish,
// /healthz, /readyz, /metrics) with their limits (header, body and write
// deadlines, idle keep-alive timeout, a cap on requests in flight). Run
// serves until its context ends, then drains: 1001 to every WebSocket and
// SSE stream, in-flight requests finished, NATS drained, the embedded
// server stopped.
//
//	srv, err := server.New(ctx, server.Options{Hooks: fabric.Hooks{Connect: auth}})
//	if err != nil { ... }
//	srv.Node().HandleRPC("chat/send", send)
//	err = srv.Run(ctx)
//
// More HTTP handlers mount with Options.Routes or Server.Handle (a Stream
// route is long-lived: no deadlines, not counted, drained gracefully). A
// Server holds no global state: several can run in one process, each with
// its own data dir, listeners and metrics registry.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/sse"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// ErrServerClosed is returned by Run on a Server already shut down or run.
var ErrServerClosed = errors.New("server: closed")

// Server is a running Fabric server; see New.
type Server struct {
	opts     Options
	log      *slog.Logger
	reg      prometheus.Registerer
	gatherer prometheus.Gatherer
	policies *policySet
	auth     *auth.Verifier // nil: authentication off (auth.go)
	proxies  *fabric.ProxyPolicy
	cert     *certificate // nil: no TLS (security.go)

	protectedRefused prometheus.Counter

	backend *backend
	node    *fabric.Node
	edge    *wsedge.Edge

	listeners []*listener // main, then admin (if any)
	refused   prometheus.Counter

	sse         *sse.Handler
	agg         *admission.Aggregator
	mu          sync.Mutex
	mounted     []*mounted
	draining    atomic.Bool
	running     bool // under mu
	stopping    bool // under mu: Shutdown or Close has begun
	serveErr    chan error
	serveWG     sync.WaitGroup
	stopped     chan struct{} // closed once shut down or closed
	stopOnce    sync.Once
	closeOnce   sync.Once
	shutdownErr error
	boot        bootState // readiness.go
}

// New builds a Server: it connects the backend (starting the embedded NATS
// server unless told otherwise), creates the Node, the WebSocket edge and
// the extensions, and binds the listeners (so Addr is known). Until Run,
// the listeners answer only the probes, at once: /healthz 200, /readyz 503
// saying what the start waits for (such as "waiting for peers (1 of 3)"
// while a cluster forms); any other request waits for Run. ctx bounds the
// start only. On error everything started is stopped.
func New(ctx context.Context, opts Options) (s *Server, err error) {
	opts = opts.withDefaults().withWeb()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	policies, _ := opts.Policies()   // validated
	proxies, _ := opts.proxyPolicy() // validated
	s = &Server{
		proxies:  proxies,
		opts:     opts,
		log:      opts.Logger,
		reg:      opts.Registerer,
		gatherer: opts.Gatherer,
		policies: newPolicySet(policies),
		serveErr: make(chan error, 2),
		stopped:  make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.reg == nil {
		r := prometheus.NewRegistry()
		r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		s.reg, s.gatherer = r, r
	} else if s.gatherer == nil {
		s.gatherer, _ = s.reg.(prometheus.Gatherer)
	}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
		}
	}()
	if opts.HTTP.TLSCert != "" {
		if s.cert, err = newCertificate(opts.HTTP.TLSCert, opts.HTTP.TLSKey); err != nil {
			return s, fmt.Errorf("server: %w", err)
		}
	}
	// Listen first: a port in use fails before the data dir is touched.
	if err := s.listen(ctx); err != nil {
		return s, err
	}
	s.serve() // readiness.go: the probes answer while the start waits
	if opts.Backend == BackendMemory {
		s.backend, err = newMemoryBackend(s)
	} else {
		s.backend, err = newNATSBackend(ctx, s)
	}
	if err != nil {
		return s, err
	}
	beforeExecute, err := s.backend.rateLimit(ctx)
	if err != nil {
		return s, err
	}
	if app := opts.BeforeExecute; app != nil {
		if beforeExecute == nil {
			beforeExecute = app
		} else {
			limit := beforeExecute
			beforeExecute = func(ctx context.Context, call *fabric.Call) error {
				if err := limit(ctx, call); err != nil {
					return err
				}
				return app(ctx, call)
			}
		}
	}
	history, err := s.backend.history(ctx)
	if err != nil {
		return s, err
	}
	beforeExecute, err = s.admission(beforeExecute)
	if err != nil {
		return s, err
	}
	// history_guard.go: reads retried through a leader election, circuit
	// breakers around appends (one per partition stream on NATS).
	if history, err = s.guardHistory(history); err != nil {
		return s, err
	}
	hooks, beforeExecute, err := s.wireAuth(opts.Hooks, beforeExecute)
	if err != nil {
		return s, err
	}
	hooks.Publish = s.policies.publishHook(hooks.Publish)
	cfg := fabric.Config{
		Broker:         s.backend.broker(),
		Registerer:     s.reg,
		Logger:         s.log,
		Hooks:          hooks,
		ConnectTimeout: opts.WebSocket.UpgradeTimeout,
		BeforeExecute:  beforeExecute,
		History:        history,
		Persistent:     s.policies.predicate(func(p *TopicPolicy) bool { return p.Persistent }),
		Pressure:       opts.Pressure,
		Limits:         opts.Limits,
		Proxies:        s.proxies,
	}
	s.node, err = fabric.NewNode(cfg)
	if err != nil {
		return s, fmt.Errorf("server: node: %w", err)
	}
	maxConns := opts.Admission.MaxConcurrent
	if maxConns == 0 {
		maxConns = defaultMaxConnections()
	}
	s.log.Debug("connection caps", "max_connections", maxConns, "max_per_ip", opts.Admission.MaxPerIP)
	up, err := fabric.NewUpgradeAdmission(s.node, fabric.UpgradeAdmissionOptions{MaxConcurrent: max(maxConns, 0),
		PerTickBudget: opts.Admission.UpgradeBudget, Tick: opts.Admission.UpgradeTick, RetryAfter: opts.Admission.RetryAfter,
		MaxPerIP: max(opts.Admission.MaxPerIP, 0)})
	if err != nil {
		return s, fmt.Errorf("server: upgrade admission: %w", err)
	}
	if err := s.activateAggregator(); err != nil {
		return s, err
	}
	s.edge, err = wsedge.New(s.node, wsedge.Options{
		Admission:        up,
		MaxPayloadLength: opts.WebSocket.MaxPayload,
		IdleTimeout:      opts.WebSocket.IdleTimeout,
		MaxBackpressure:  opts.WebSocket.MaxBackpressure,
		AllowedOrigins:   opts.HTTP.AllowedOrigins,
		AllowedHosts:     opts.HTTP.AllowedHosts,
		Compression:      opts.WebSocket.Compression,
		GoroutinePerConn: opts.WebSocket.GoroutinePerConn,
	})
	if err != nil {
		return s, fmt.Errorf("server: websocket edge: %w", err)
	}
	if !opts.SSE.Disable {
		s.sse, err = sse.New(s.node, sse.Options{
			Admission:       up,
			AllowedOrigins:  opts.HTTP.AllowedOrigins,
			AllowedHosts:    opts.HTTP.AllowedHosts,
			MaxBackpressure: opts.SSE.MaxBackpressure,
			Heartbeat:       opts.SSE.Heartbeat,
			MaxTopics:       opts.SSE.MaxTopics,
			MaxFrame:        opts.WebSocket.MaxPayload,
			WriteTimeout:    opts.SSE.WriteTimeout,
		})
		if err != nil {
			return s, fmt.Errorf("server: sse: %w", err)
		}
	}
	if err := s.backend.postgres(ctx, s.node); err != nil {
		return s, err
	}
	// Presence and the cluster view observe the node's connections: both
	// start before the edge accepts any.
	if err := s.backend.presence(ctx); err != nil {
		return s, err
	}
	if !opts.NoClusterView {
		if err := s.backend.cluster(ctx); err != nil {
			return s, err
		}
	}
	if err := s.mountBuiltins(); err != nil {
		return s, err
	}
	if err := s.mountWeb(); err != nil {
		return s, err
	}
	for _, r := range opts.Routes {
		if err := s.Handle(r); err != nil {
			return s, err
		}
	}
	s.boot.built.Store(true)
	return s, nil
}

// Run serves HTTP until ctx ends, then shuts down gracefully within
// Options.ShutdownTimeout and returns Shutdown's error. It returns nil at
// once when Shutdown or Close stops the server first, and a listener's
// failure after closing everything. A Server runs once.
func (s *Server) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.stopping || s.running {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.running = true
	s.mu.Unlock()
	s.serve() // New started it: a no-op
	s.boot.open.Store(true)
	close(s.boot.openedCh()) // requests that came before Run go on
	s.invalidateReadiness()
	s.log.Info("fabric serving", "http", s.Addr(), "admin", s.AdminAddr(), "ws", s.opts.WebSocket.Path, "backend", s.opts.Backend, "tls", s.cert != nil)
	switch {
	case s.opts.protected():
		s.log.Info("protected mode: no authentication configured, serving clients on this host only (docs/security.md)")
	case s.opts.anonymousOpen():
		s.log.Warn("ANONYMOUS ACCESS: --allow-anonymous lets clients without a token connect from anywhere; they read public topics and do what topic policies allow anonymous clients (docs/security.md)")
	}
	select {
	case <-ctx.Done():
		s.log.Info("shutting down", "timeout", s.opts.ShutdownTimeout)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.opts.ShutdownTimeout)
		defer cancel()
		return s.Shutdown(sctx)
	case err := <-s.serveErr:
		s.Close()
		return err
	case <-s.stopped:
		return nil
	}
}

// Shutdown drains the server: /readyz turns 503, the listeners stop
// accepting, every WebSocket and SSE stream gets 1001 Going Away, other
// Stream routes' contexts end, in-flight requests finish; then the
// extensions, the node, the NATS connection (drained) and the embedded
// server stop. When ctx ends first, what is left is cut. It may be called
// while Run runs or instead of it; later calls wait for the first one and
// return its result.
func (s *Server) Shutdown(ctx context.Context) error {
	first := false
	s.stopOnce.Do(func() {
		first = true
		s.beginStop()
		var errs []error
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, l := range s.listeners {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := l.srv.Shutdown(ctx); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("http %s: %w", l.ln.Addr(), err))
					mu.Unlock()
				}
			}()
		}
		routeErrs := s.drainRoutes(ctx)
		wg.Wait()
		s.release(ctx)
		s.shutdownErr = errors.Join(append(errs, routeErrs...)...)
		close(s.stopped)
	})
	if !first {
		<-s.stopped
	}
	return s.shutdownErr
}

// Close stops everything at once: connections are cut, nothing drains.
func (s *Server) Close() error {
	s.stopOnce.Do(func() {
		s.beginStop()
		s.cutRoutes()
		for _, l := range s.listeners {
			_ = l.srv.Close()
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		s.release(ctx)
		close(s.stopped)
	})
	<-s.stopped
	return nil
}

// beginStop marks the server draining; Run no longer starts after it.
func (s *Server) beginStop() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	s.draining.Store(true)
}

// release stops what sits behind the connections, in order; a done ctx
// skips the NATS drain.
func (s *Server) release(ctx context.Context) {
	s.closeOnce.Do(func() {
		for _, l := range s.listeners {
			_ = l.srv.Close() // after Shutdown: only what ctx left behind
			_ = l.ln.Close()
		}
		if s.edge != nil {
			_ = s.edge.Close()
		}
		if s.agg != nil {
			s.agg.Deactivate()
		}
		if s.backend != nil {
			s.backend.closeExtensions()
		}
		if s.node != nil {
			_ = s.node.Close()
		}
		if s.backend != nil {
			s.backend.close(ctx)
		}
		s.serveWG.Wait()
		s.cutRoutes()
	})
}

// Done is closed once the server has shut down or closed.
func (s *Server) Done() <-chan struct{} { return s.stopped }

// Node returns the server's Node: register RPC handlers (HandleRPC),
// publish, observe connections.
func (s *Server) Node() *fabric.Node { return s.node }

// Edge returns the WebSocket edge.
func (s *Server) Edge() *wsedge.Edge { return s.edge }

// History returns the history of persistent topics.
func (s *Server) History() fabric.History { return s.backend.historyStore() }

// Presence returns the presence tracker, nil when no policy has presence.
func (s *Server) Presence() *fabric.Presence { return s.backend.presenceTracker() }

// Cluster returns the cluster-wide view, nil with Options.NoClusterView.
func (s *Server) Cluster() fabric.ClusterView { return s.backend.clusterView() }

// NATS returns the NATS connection, nil on the memory backend.
func (s *Server) NATS() *nats.Conn { return s.backend.natsConn() }

// Embedded returns the embedded NATS server, nil when there is none.
func (s *Server) Embedded() *embed.Server { return s.backend.embedded() }

// Name returns this instance's name: the embedded server's, the NATS
// server's an external connection is attached to, or the node's ID.
func (s *Server) Name() string { return s.backend.name() }

// Options returns the options in effect, defaults filled in.
func (s *Server) Options() Options { return s.opts }

// Addr returns the main listener's address (host:port).
func (s *Server) Addr() string { return s.listeners[0].ln.Addr().String() }

// AdminAddr returns the admin listener's address, or Addr without one.
func (s *Server) AdminAddr() string { return s.listeners[len(s.listeners)-1].ln.Addr().String() }

// Draining reports whether the server has started shutting down.
func (s *Server) Draining() bool { return s.draining.Load() }

// listenConfig returns the ListenConfig for the server's listeners.
func (s *Server) listenConfig() net.ListenConfig {
	lc := net.ListenConfig{}
	if s.opts.HTTP.ReusePort {
		lc.Control = reusePort
	}
	return lc
}

// Ready reports whether the server can serve: running and not draining,
// the backend answers (NATS connected, JetStream responding) and, until it
// has once been ready, its cluster has formed (see readiness.go; the check
// is cached for a second). The error says what it waits for.
func (s *Server) Ready(ctx context.Context) error {
	if s.draining.Load() {
		return errors.New("draining")
	}
	r := s.readiness(ctx)
	if r.ready() {
		return nil
	}
	if r.waitingFor == "starting" {
		return errors.New("starting")
	}
	if r.err != "" {
		return fmt.Errorf("waiting for %s: %s", r.waitingFor, r.err)
	}
	return errors.New("waiting for " + r.waitingFor)
}
