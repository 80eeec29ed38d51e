package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// config is everything `fabric serve` can be told.
type config struct {
	Listen          string
	WSPath          string
	ReusePort       bool
	ShutdownTimeout time.Duration
	APIKey          string
	ClientPublish   string
	LogLevel        string
	LogFormat       string

	DataDir       string
	Name          string
	NATSListen    string
	NATSMonitor   string
	ClusterName   string
	ClusterListen string
	Routes        string
	LeafRemote    string
	LeafCreds     string
	LeafListen    string
	JSDomain      string
	SyncAlways    bool
	SubjectPrefix string

	NATSURL     string
	NATSCreds   string
	NATSNkey    string
	NATSToken   string
	NATSTLSCert string
	NATSTLSKey  string
	NATSTLSCA   string

	AllowedOrigins   string
	MaxPayload       int
	IdleTimeout      time.Duration
	MaxBackpressure  int
	UpgradeTimeout   time.Duration
	Compression      bool
	GoroutinePerConn bool

	Ext extConfig // presence and rate limits (extensions.go)
}

func serveFlags(c *config) *flagSet {
	fs := newFlagSet("serve")
	fs.section("HTTP")
	fs.str(&c.Listen, "listen", ":8080", "HTTP address for /ws, /api/publish, /healthz, /readyz, /metrics")
	fs.str(&c.WSPath, "ws-path", "/ws", "path of the WebSocket endpoint")
	fs.boolean(&c.ReusePort, "reuseport", false, "set SO_REUSEPORT so several processes share the port")
	fs.duration(&c.ShutdownTimeout, "shutdown-timeout", 30*time.Second, "on SIGTERM/SIGINT, how long to drain before exiting")
	fs.str(&c.APIKey, "api-key", "", "bearer key for POST /api/publish; without it only loopback clients may publish")
	fs.str(&c.ClientPublish, "client-publish", "", "topics WebSocket clients may publish to with the fabric/publish RPC, comma-separated globs (none by default)")
	fs.str(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.str(&c.LogFormat, "log-format", "text", "text or json")

	fs.section("Embedded NATS (the default)")
	fs.str(&c.DataDir, "data", embed.DefaultDataDir, "data dir: JetStream store and instance lock (one instance per dir)")
	fs.str(&c.Name, "name", "", "server name, unique in a cluster (default: generated once, kept in the data dir)")
	fs.str(&c.NATSListen, "nats-listen", "", "open a NATS client port on this address (none by default)")
	fs.str(&c.NATSMonitor, "nats-monitor", "", "open the embedded NATS server's HTTP monitoring (/varz, /jsz, ...) on this address (none by default)")
	fs.str(&c.ClusterName, "cluster-name", "fabric", "NATS cluster name shared by the instances")
	fs.str(&c.ClusterListen, "cluster-listen", "", "address peers route to, e.g. 0.0.0.0:6222")
	fs.str(&c.Routes, "routes", "", "peers' cluster URLs, comma separated: nats://host:6222,...")
	fs.str(&c.LeafRemote, "leaf-remote", "", "attach as a leaf node to these NATS leafnode URLs, comma separated")
	fs.str(&c.LeafCreds, "leaf-creds", "", "credentials file for the leaf connection")
	fs.str(&c.LeafListen, "leaf-listen", "", "accept leaf nodes on this address (act as a hub)")
	fs.str(&c.JSDomain, "js-domain", "", "JetStream domain (default with --leaf-remote: the server name)")
	fs.boolean(&c.SyncAlways, "sync-always", false, "fsync JetStream writes before acknowledging them")
	fs.str(&c.SubjectPrefix, "subject-prefix", fjs.DefaultPrefix, "first token of every Fabric subject (isolates tenants)")

	fs.section("External NATS (instead of the embedded server)")
	fs.str(&c.NATSURL, "nats-url", "", "connect to this NATS deployment instead of embedding a server")
	fs.str(&c.NATSCreds, "nats-creds", "", "credentials (.creds) file")
	fs.str(&c.NATSNkey, "nats-nkey", "", "nkey seed file")
	fs.str(&c.NATSToken, "nats-token", "", "authentication token")
	fs.str(&c.NATSTLSCert, "nats-tls-cert", "", "client certificate (PEM)")
	fs.str(&c.NATSTLSKey, "nats-tls-key", "", "client key (PEM)")
	fs.str(&c.NATSTLSCA, "nats-tls-ca", "", "CA bundle to verify the server (PEM)")

	fs.section("WebSocket")
	fs.str(&c.AllowedOrigins, "allowed-origins", "same-origin", "same-origin, * or a comma-separated list of origins")
	fs.integer(&c.MaxPayload, "max-payload", wsedge.DefaultMaxPayloadLength, "largest client message in bytes (larger closes with 1009)")
	fs.duration(&c.IdleTimeout, "idle-timeout", wsedge.DefaultIdleTimeout, "close connections silent this long (pings keep healthy ones alive)")
	fs.integer(&c.MaxBackpressure, "max-backpressure", wsedge.DefaultMaxBackpressure, "bytes queued per connection before its messages are dropped")
	fs.duration(&c.UpgradeTimeout, "upgrade-timeout", fabric.DefaultConnectTimeout, "bound on the connect hook")
	fs.boolean(&c.Compression, "compression", false, "negotiate permessage-deflate")
	fs.boolean(&c.GoroutinePerConn, "goroutine-per-conn", false, "read each connection with its own goroutine instead of epoll")
	extFlags(fs, &c.Ext)
	return fs
}

// server is a running `fabric serve`.
type server struct {
	cfg     config
	log     *slog.Logger
	ns      *embed.Server
	nc      *nats.Conn
	js      jetstream.JetStream
	broker  *fjs.Broker
	node    *fabric.Node
	edge    *wsedge.Edge
	http    *http.Server
	ln      net.Listener
	reg     *prometheus.Registry
	serveWG sync.WaitGroup

	readyMu   sync.Mutex
	readyAt   time.Time
	readyErr  error
	draining  bool
	serveErr  chan error
	ext       extensions
	closeOnce sync.Once
}

// start brings up NATS, the node, the edge and the HTTP listener.
func start(ctx context.Context, cfg config, log *slog.Logger) (*server, error) {
	s := &server{cfg: cfg, log: log, reg: prometheus.NewRegistry(), serveErr: make(chan error, 1)}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	ok := false
	defer func() {
		if !ok {
			s.close()
		}
	}()
	if err := s.connectNATS(ctx); err != nil {
		return nil, err
	}
	js, err := jetstream.New(s.nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	s.js = js
	s.broker = fjs.NewBroker(s.nc, fjs.BrokerOptions{Prefix: cfg.SubjectPrefix})
	beforeExecute, err := s.startRateLimit(ctx)
	if err != nil {
		return nil, err
	}
	history, err := s.startHistory(ctx)
	if err != nil {
		return nil, err
	}
	var hooks fabric.Hooks
	if patterns := splitList(cfg.ClientPublish); len(patterns) > 0 {
		match := fabric.MatchTopics(patterns)
		hooks.Publish = func(_ *fabric.Client, topic, _ string) error {
			if match(topic) {
				return nil
			}
			return fabric.NewLiveError(fabric.CodeForbidden, "publishing to this topic is not allowed")
		}
	}
	s.node, err = fabric.NewNode(fabric.Config{Broker: s.broker, Registerer: s.reg, Logger: log, BeforeExecute: beforeExecute,
		History: history, Persistent: fabric.MatchTopics(splitList(cfg.Ext.Replay)), Hooks: hooks, ConnectTimeout: cfg.UpgradeTimeout})
	if err != nil {
		return nil, err
	}
	origins := splitList(cfg.AllowedOrigins)
	s.edge, err = wsedge.New(s.node, wsedge.Options{
		MaxPayloadLength: cfg.MaxPayload,
		IdleTimeout:      cfg.IdleTimeout,
		MaxBackpressure:  cfg.MaxBackpressure,
		AllowedOrigins:   origins,
		Compression:      cfg.Compression,
		GoroutinePerConn: cfg.GoroutinePerConn,
	})
	if err != nil {
		return nil, err
	}
	if err := s.startPresence(ctx); err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	mux.Handle(cfg.WSPath, s.edge)
	mux.Handle("/api/publish", s.node.PublishHandler(fabric.APIOptions{Key: cfg.APIKey}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "instance": s.instanceName()})
	})
	mux.HandleFunc("/readyz", s.readyz)
	mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}

	lc := net.ListenConfig{}
	if cfg.ReusePort {
		lc.Control = reusePort
	}
	s.ln, err = lc.Listen(ctx, "tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	s.serveWG.Add(1)
	go func() {
		defer s.serveWG.Done()
		if err := s.http.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.serveErr <- err
		}
	}()
	ok = true
	return s, nil
}

func (s *server) connectNATS(ctx context.Context) error {
	cfg := s.cfg
	if cfg.NATSURL != "" {
		opts := []nats.Option{nats.Name("fabric"), nats.MaxReconnects(-1), nats.ReconnectWait(500 * time.Millisecond)}
		if cfg.NATSCreds != "" {
			opts = append(opts, nats.UserCredentials(cfg.NATSCreds))
		}
		if cfg.NATSNkey != "" {
			o, err := nats.NkeyOptionFromSeed(cfg.NATSNkey)
			if err != nil {
				return fmt.Errorf("nats nkey: %w", err)
			}
			opts = append(opts, o)
		}
		if cfg.NATSToken != "" {
			opts = append(opts, nats.Token(cfg.NATSToken))
		}
		if cfg.NATSTLSCert != "" || cfg.NATSTLSCA != "" {
			tc, err := tlsConfig(cfg)
			if err != nil {
				return err
			}
			opts = append(opts, nats.Secure(tc))
		}
		nc, err := nats.Connect(cfg.NATSURL, opts...)
		if err != nil {
			return fmt.Errorf("connect to NATS at %s: %w", cfg.NATSURL, err)
		}
		s.nc = nc
		s.log.Info("connected to external NATS", "url", nc.ConnectedUrlRedacted())
		return nil
	}
	ns, err := embed.Start(ctx, embed.Options{
		Name:            cfg.Name,
		DataDir:         cfg.DataDir,
		ClientListen:    cfg.NATSListen,
		MonitorListen:   cfg.NATSMonitor,
		ClusterName:     cfg.ClusterName,
		ClusterListen:   cfg.ClusterListen,
		Routes:          splitList(cfg.Routes),
		LeafRemotes:     splitList(cfg.LeafRemote),
		LeafCredentials: cfg.LeafCreds,
		LeafListen:      cfg.LeafListen,
		JetStreamDomain: cfg.JSDomain,
		SyncAlways:      cfg.SyncAlways,
		Logger:          s.log,
	})
	if err != nil {
		return err
	}
	s.ns = ns
	s.nc, err = ns.Connect()
	if err != nil {
		return err
	}
	s.log.Info("embedded NATS started", "name", ns.Name(), "data", cfg.DataDir,
		"client", ns.ClientURL(), "cluster", ns.ClusterURL(), "leaf", ns.LeafURL())
	return nil
}

func tlsConfig(cfg config) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.NATSTLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.NATSTLSCert, cfg.NATSTLSKey)
		if err != nil {
			return nil, fmt.Errorf("nats tls cert: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	if cfg.NATSTLSCA != "" {
		pem, err := os.ReadFile(cfg.NATSTLSCA)
		if err != nil {
			return nil, fmt.Errorf("nats tls ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("nats tls ca: no certificate in %s", cfg.NATSTLSCA)
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

// readyz answers 200 once NATS is connected and JetStream answers; the
// JetStream check is cached for a second.
func (s *server) readyz(w http.ResponseWriter, r *http.Request) {
	s.readyMu.Lock()
	if s.draining {
		s.readyMu.Unlock()
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "draining"})
		return
	}
	if time.Since(s.readyAt) > time.Second {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		s.readyErr = nil
		if st := s.nc.Status(); st != nats.CONNECTED {
			s.readyErr = fmt.Errorf("nats %s", st)
		} else if _, err := s.js.AccountInfo(ctx); err != nil {
			s.readyErr = fmt.Errorf("jetstream: %w", err)
		}
		cancel()
		s.readyAt = time.Now()
	}
	err := s.readyErr
	s.readyMu.Unlock()
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "not ready", "error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ready"})
}

// shutdown stops accepting, closes every WebSocket with 1001, drains NATS
// and stops the embedded server, within ctx.
func (s *server) shutdown(ctx context.Context) error {
	s.readyMu.Lock()
	s.draining = true
	s.readyMu.Unlock()
	var errs []error
	if err := s.http.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("http: %w", err))
	}
	if err := s.edge.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("websockets: %w", err))
	}
	s.close()
	return errors.Join(errs...)
}

// close releases everything without waiting for clients.
func (s *server) close() {
	s.closeOnce.Do(func() {
		if s.ln != nil {
			s.ln.Close() // already closed after http.Shutdown; harmless
		}
		if s.edge != nil {
			s.edge.Close()
		}
		s.closeExtensions()
		if s.node != nil {
			s.node.Close()
		}
		if s.broker != nil {
			s.broker.Close()
		}
		if s.nc != nil {
			done := make(chan struct{})
			s.nc.SetClosedHandler(func(*nats.Conn) { close(done) })
			if err := s.nc.Drain(); err != nil {
				s.nc.Close()
			} else {
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					s.nc.Close()
				}
			}
		}
		if s.ns != nil {
			s.ns.Shutdown()
		}
		s.serveWG.Wait()
	})
}

// instanceName names this process: the embedded server's name, or the NATS
// server an external connection is attached to.
func (s *server) instanceName() string {
	if s.ns != nil {
		return s.ns.Name()
	}
	return s.nc.ConnectedServerName()
}

// Addr returns the HTTP listener's address.
func (s *server) Addr() string { return s.ln.Addr().String() }

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

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
