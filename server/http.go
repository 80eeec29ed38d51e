package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fabricrt/fabric/api"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// routeKind is how a listener treats a route's requests.
type routeKind uint8

const (
	kindRequest routeKind = iota // deadlines, counted in MaxRequests
	kindProbe                    // deadlines, not counted (/healthz, /readyz)
	kindStream                   // no deadlines, not counted, ended by the drain
)

// mounted is one route as the listeners see it.
type mounted struct {
	kind     routeKind
	drain    context.Context // Stream: ends when the route has drained
	drained  context.CancelFunc
	shutdown func(context.Context) error
}

// listener is one HTTP listener with its mux and limits.
type listener struct {
	s      *Server
	ln     net.Listener
	srv    *http.Server
	mux    *http.ServeMux
	public bool // serves the non-admin routes
	admin  bool // serves the admin routes

	inflight atomic.Int64
	mu       sync.RWMutex
	routes   map[string]*mounted // by mux pattern
}

// listen binds the main listener and, if asked, the admin one.
func (s *Server) listen(ctx context.Context) error {
	h := s.opts.HTTP
	adminApart := h.AdminListen != "" || h.AdminListener != nil
	main, err := s.bind(ctx, h.Listener, h.Listen)
	if err != nil {
		return err
	}
	if s.cert != nil {
		main = tls.NewListener(main, s.cert.config())
	}
	s.listeners = append(s.listeners, s.newListener(main, true, !adminApart))
	if adminApart {
		ln, err := s.bind(ctx, h.AdminListener, h.AdminListen)
		if err != nil {
			return err
		}
		if s.cert != nil {
			ln = tls.NewListener(ln, s.cert.config())
		}
		s.listeners = append(s.listeners, s.newListener(ln, false, true))
	}
	inflight := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "fabric_http_requests_in_flight", Help: "HTTP requests being served, streaming routes (WebSocket, SSE) and probes aside.",
	}, func() float64 {
		n := int64(0)
		for _, l := range s.listeners {
			n += l.inflight.Load()
		}
		return float64(n)
	})
	s.refused = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fabric_http_requests_refused_total", Help: "HTTP requests answered 503 at once because HTTP.MaxRequests were in flight.",
	})
	s.protectedRefused = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fabric_protected_refused_total", Help: "Connection requests refused with 403 in protected mode (no authentication configured): not from this host, or through a proxy.",
	})
	for _, c := range []prometheus.Collector{inflight, s.refused, s.protectedRefused} {
		if err := s.reg.Register(c); err != nil {
			return fmt.Errorf("server: register metrics: %w", err)
		}
	}
	return nil
}

func (s *Server) bind(ctx context.Context, ln net.Listener, addr string) (net.Listener, error) {
	if ln != nil {
		return ln, nil
	}
	lc := s.listenConfig()
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("server: listen %s: %w", addr, err)
	}
	return ln, nil
}

func (s *Server) newListener(ln net.Listener, public, admin bool) *listener {
	h := s.opts.HTTP
	l := &listener{s: s, ln: ln, mux: http.NewServeMux(), public: public, admin: admin, routes: map[string]*mounted{}}
	l.srv = &http.Server{
		Handler:           l,
		ReadHeaderTimeout: h.ReadHeaderTimeout,
		IdleTimeout:       h.IdleTimeout,
		MaxHeaderBytes:    h.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return l
}

// mountBuiltins mounts the server's own routes: the transports (Stream
// routes, drained gracefully), the API (Admin), the probes and /metrics.
func (s *Server) mountBuiltins() error {
	routes := []Route{
		{Pattern: s.opts.WebSocket.Path, Handler: s.protectedGate(s.edge), Stream: true, Shutdown: s.edge.Shutdown},
		{Pattern: "/api/", Handler: api.New(api.Options{Node: s.node, Cluster: s.Cluster(), Presence: s.Presence(),
			Key: s.opts.HTTP.APIKey, Logger: s.log, Proxies: s.proxies}), Admin: true},
	}
	if s.sse != nil {
		// GET is the stream; POST carries one frame: an ordinary request.
		routes = append(routes,
			Route{Pattern: "GET " + s.opts.SSE.Path, Handler: s.protectedGate(s.sse), Stream: true, Shutdown: s.sse.Shutdown},
			Route{Pattern: s.opts.SSE.Path, Handler: s.protectedGate(s.sse)})
	}
	for _, r := range routes {
		if err := s.Handle(r); err != nil {
			return err
		}
	}
	// Probes and metrics answer even at the request cap: that is when they
	// are needed.
	probe := &mounted{kind: kindProbe}
	for _, l := range s.listeners {
		probes := map[string]http.Handler{"/healthz": http.HandlerFunc(s.healthz), "/readyz": http.HandlerFunc(s.readyz)}
		if s.gatherer != nil && l.admin {
			probes["/metrics"] = promhttp.HandlerFor(s.gatherer, promhttp.HandlerOpts{})
		}
		for p, h := range probes {
			if err := l.handle(p, h, probe); err != nil {
				return err
			}
		}
	}
	return nil
}

// Handle mounts r on the listener(s) that serve its kind of route (see
// Route.Admin). It may be called before or after Run; a pattern already
// mounted, or conflicting with one, is an error.
func (s *Server) Handle(r Route) error {
	if r.Pattern == "" || r.Handler == nil {
		return errors.New("server: a route needs a pattern and a handler")
	}
	m := &mounted{kind: kindRequest, shutdown: r.Shutdown}
	if r.Stream {
		m.kind = kindStream
		m.drain, m.drained = context.WithCancel(context.Background())
	}
	for _, l := range s.listeners {
		if (r.Admin && l.admin) || (!r.Admin && l.public) {
			if err := l.handle(r.Pattern, r.Handler, m); err != nil {
				return err
			}
		}
	}
	s.mu.Lock()
	s.mounted = append(s.mounted, m)
	s.mu.Unlock()
	if s.draining.Load() && m.drained != nil {
		m.drained()
	}
	return nil
}

func (l *listener) handle(pattern string, h http.Handler, m *mounted) (err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, dup := l.routes[pattern]; dup {
		return fmt.Errorf("server: route %q mounted twice", pattern)
	}
	defer func() {
		if p := recover(); p != nil { // ServeMux panics on conflicting patterns
			err = fmt.Errorf("server: route %q: %v", pattern, p)
		}
	}()
	l.mux.Handle(pattern, h)
	l.routes[pattern] = m
	return nil
}

// drainRoutes runs every route's Shutdown (in parallel) and then ends its
// streams' contexts; a route without Shutdown ends them at once.
func (s *Server) drainRoutes(ctx context.Context) []error {
	s.mu.Lock()
	routes := append([]*mounted(nil), s.mounted...)
	s.mu.Unlock()
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, m := range routes {
		if m.shutdown == nil {
			if m.drained != nil {
				m.drained()
			}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.shutdown(ctx); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
			if m.drained != nil {
				m.drained()
			}
		}()
	}
	wg.Wait()
	return errs
}

// cutRoutes ends every stream's context at once.
func (s *Server) cutRoutes() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.mounted {
		if m.drained != nil {
			m.drained()
		}
	}
}

// ServeHTTP applies the listener's limits, then the mux: requests get a
// body deadline (cleared once the body is read, so that a slow handler's
// context is not cancelled by it) and a write deadline, and count against
// MaxRequests; streaming routes get neither, and a context that ends when
// the route drains.
func (l *listener) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !l.s.boot.open.Load() { // readiness.go: before Run, the probes only
		l.serveBeforeRun(w, r)
		return
	}
	_, pattern := l.mux.Handler(r)
	l.mu.RLock()
	m := l.routes[pattern]
	l.mu.RUnlock()
	kind := kindRequest
	if m != nil {
		kind = m.kind
	}
	if kind == kindStream {
		// Deadlines a previous request on this connection left behind
		// must not cut the stream; a body (streams have none) still gets
		// its deadline, or a trickled one would hold the connection.
		rc := http.NewResponseController(w)
		_ = rc.SetWriteDeadline(time.Time{})
		l.bodyDeadline(r, rc, time.Now())
		ctx, cancel := context.WithCancel(r.Context())
		stop := context.AfterFunc(m.drain, cancel)
		defer stop()
		defer cancel()
		l.mux.ServeHTTP(w, r.WithContext(ctx))
		return
	}
	if max := int64(l.s.opts.HTTP.MaxRequests); kind == kindRequest && max > 0 {
		if l.inflight.Add(1) > max {
			l.inflight.Add(-1)
			l.s.refused.Inc()
			w.Header().Set("Retry-After", "1")
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "server busy: too many requests in flight, retry later"})
			return
		}
		defer l.inflight.Add(-1)
	}
	rc := http.NewResponseController(w)
	now := time.Now()
	l.bodyDeadline(r, rc, now)
	_ = rc.SetWriteDeadline(now.Add(l.s.opts.HTTP.WriteTimeout))
	l.mux.ServeHTTP(w, r)
}

// bodyDeadline bounds reading r's body, if it has one, and clears the read
// deadline otherwise.
func (l *listener) bodyDeadline(r *http.Request, rc *http.ResponseController, now time.Time) {
	if r.Body == nil || r.Body == http.NoBody {
		_ = rc.SetReadDeadline(time.Time{})
		return
	}
	_ = rc.SetReadDeadline(now.Add(l.s.opts.HTTP.BodyTimeout))
	r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
}

// deadlineBody clears the connection's read deadline once the body has
// been read to its end: net/http then watches the connection for the
// client going away, and a deadline hit there would cancel the request's
// context.
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "instance": s.Name()})
}

// readyz answers 200 once the backend answers (see Ready), 503 otherwise
// and while draining.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "draining"})
		return
	}
	rep := s.readiness(r.Context()) // readiness.go
	if !rep.ready() {
		writeJSON(w, http.StatusServiceUnavailable, rep.body())
		return
	}
	body := rep.body()
	if s.opts.anonymousOpen() {
		body["anonymous"] = true // --allow-anonymous: said wherever someone looks
	}
	// The Postgres bridge's state is reported, not enforced: a database
	// outage must not take every instance out of the load balancer while
	// their clients are still served.
	if pg := s.backend.pg; pg != nil {
		if err := pg.Ready(); err != nil {
			body["postgres"] = err.Error()
		} else {
			body["postgres"] = "ok"
		}
	}
	writeJSON(w, http.StatusOK, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func reusePort(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
	})
	if err != nil {
		return err
	}
	return serr
}
