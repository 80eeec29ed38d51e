package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/memory"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/fabricrt/fabric/redis"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// backend is what sits behind the node: NATS (embedded or external) or the
// in-memory backend, and the extensions built on it. Exactly one of the
// NATS fields or mem is set.
type backend struct {
	s *Server

	ns      *embed.Server
	nc      *nats.Conn
	ownConn bool // nc was dialled or made here, so it is drained here
	js      jetstream.JetStream

	mem *memory.Backend

	red *redis.Backend // see backend_redis.go

	pg *pgbridge.Bridge

	br       fabric.Broker
	hist     fabric.History
	pres     *fabric.Presence
	cl       fabric.ClusterView
	closers  []func() // extensions, closed last first
	brCloser func()
}

// newNATSBackend connects to NATS: the caller's connection, an external
// deployment, or the embedded server it starts.
func newNATSBackend(ctx context.Context, s *Server) (*backend, error) {
	if s.opts.Backend == BackendRedis { // server.go knows two kinds; Redis is the third
		return newRedisBackend(ctx, s)
	}
	b := &backend{s: s}
	o := s.opts
	switch {
	case o.NATS.Conn != nil:
		b.nc = o.NATS.Conn
	case o.NATS.URL != "":
		nc, err := dialNATS(o.NATS)
		if err != nil {
			return b, err
		}
		b.nc, b.ownConn = nc, true
		s.log.Info("connected to external NATS", "url", nc.ConnectedUrlRedacted())
	default:
		e := o.Embed
		eo, err := o.EmbedConfig() // cluster.go
		if err != nil {
			return b, fmt.Errorf("server: %w", err)
		}
		eo.Logger = s.log
		ns, err := embed.Start(ctx, eo)
		if err != nil {
			return b, fmt.Errorf("server: embedded NATS: %w", err)
		}
		b.ns = ns
		s.boot.embedded.Store(ns) // readiness.go: /readyz says what the start waits for
		if b.nc, err = ns.Connect(); err != nil {
			return b, fmt.Errorf("server: connect to the embedded NATS server: %w", err)
		}
		b.ownConn = true
		s.log.Info("embedded NATS started", "name", ns.Name(), "data", e.DataDir,
			"client", ns.ClientURL(), "cluster", ns.ClusterURL(), "leaf", ns.LeafURL())
	}
	js, err := jetstream.New(b.nc)
	if err != nil {
		return b, fmt.Errorf("server: jetstream: %w", err)
	}
	b.js = js
	br := fjs.NewBroker(b.nc, fjs.BrokerOptions{Prefix: o.NATS.SubjectPrefix})
	b.br, b.brCloser = br, func() { _ = br.Close() }
	b.collect(br)
	return b, nil
}

// newMemoryBackend makes the in-memory backend.
func newMemoryBackend(s *Server) (*backend, error) {
	n, age, err := s.replaySize()
	if err != nil {
		return nil, err
	}
	b := &backend{s: s}
	b.mem = memory.New(memory.Options{MaxPerTopic: n, MaxAge: age, Logger: s.log})
	br := b.mem.Broker()
	b.br, b.brCloser = br, func() { _ = br.Close() }
	b.collect(br)
	s.log.Info("in-memory backend: one process, nothing survives a restart")
	return b, nil
}

// collect registers c when it is a prometheus.Collector.
func (b *backend) collect(c any) {
	if col, ok := c.(prometheus.Collector); ok {
		if err := b.s.reg.Register(col); err != nil {
			b.s.log.Warn("metrics not registered", "err", err)
		}
	}
}

func dialNATS(o NATSOptions) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name("fabric"), nats.MaxReconnects(-1), nats.ReconnectWait(500 * time.Millisecond)}
	if o.Creds != "" {
		opts = append(opts, nats.UserCredentials(o.Creds))
	}
	if o.Nkey != "" {
		opt, err := nats.NkeyOptionFromSeed(o.Nkey)
		if err != nil {
			return nil, fmt.Errorf("server: nats nkey: %w", err)
		}
		opts = append(opts, opt)
	}
	if o.Token != "" {
		opts = append(opts, nats.Token(o.Token))
	}
	if o.TLSCert != "" || o.TLSCA != "" {
		tc, err := tlsConfig(o)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("server: connect to NATS at %s: %w", o.URL, err)
	}
	return nc, nil
}

func tlsConfig(o NATSOptions) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(o.TLSCert, o.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("server: nats tls cert: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	if o.TLSCA != "" {
		pem, err := os.ReadFile(o.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("server: nats tls ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("server: nats tls ca: no certificate in %s", o.TLSCA)
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

// replaySize is the history size the persistent policies agree on.
func (s *Server) replaySize() (int, time.Duration, error) {
	return replaySize(s.policies.ps, s.opts.Replay.MaxPerTopic, s.opts.Replay.MaxAge)
}

func (b *backend) broker() fabric.Broker { return b.br }

// history opens the history. It always runs, so that Persist() and the
// publish API's "persist" work without persistent policies too.
func (b *backend) history(ctx context.Context) (fabric.History, error) {
	s := b.s
	n, age, err := s.replaySize()
	if err != nil {
		return nil, err
	}
	persistent := s.policies.patterns(func(p *TopicPolicy) bool { return p.Persistent })
	if b.mem != nil {
		b.hist = b.mem.History()
	} else if b.red != nil {
		b.hist = b.red.History()
	} else {
		h, err := fjs.NewHistory(ctx, b.js, fjs.HistoryOptions{
			Prefix:      s.opts.NATS.SubjectPrefix,
			Eager:       len(persistent) > 0,
			MaxPerTopic: n,
			MaxAge:      age,
			Replicas:    s.opts.HistoryReplicas(), // cluster.go: min(3, cluster size) unless set
		})
		if err != nil {
			return nil, fmt.Errorf("server: history: %w", err)
		}
		b.hist = h
		if c, ok := any(h).(io.Closer); ok {
			b.closers = append(b.closers, func() { _ = c.Close() })
		}
	}
	if len(persistent) > 0 {
		s.log.Info("replay on", "topics", persistent, "max_per_topic", n, "max_age", age)
	}
	return b.hist, nil
}

// rateLimit starts the RPC rate limiter when one is configured and returns
// the node's BeforeExecute for it (nil without).
func (b *backend) rateLimit(ctx context.Context) (func(context.Context, *fabric.Call) error, error) {
	o := b.s.opts.RateLimit
	if o.Points <= 0 {
		return nil, nil
	}
	keyBy, _ := fabric.KeyByName(o.By) // validated
	var l fabric.RateLimiter
	if b.mem != nil {
		l = b.mem.RateLimiter(memory.RateLimitOptions{Name: "rpc", Points: o.Points, Interval: o.Interval, BlockDuration: o.Block})
	} else if b.red != nil {
		l = b.redisLimiter(o)
	} else {
		jl, err := fjs.NewRateLimiter(ctx, b.js, fjs.RateLimitOptions{
			Prefix:        b.s.opts.NATS.SubjectPrefix,
			Name:          "rpc",
			Points:        o.Points,
			Interval:      o.Interval,
			BlockDuration: o.Block,
			Replicas:      b.s.opts.KVReplicas(),
			Logger:        b.s.log,
		})
		if err != nil {
			return nil, fmt.Errorf("server: rate limiter: %w", err)
		}
		b.closers = append(b.closers, func() { _ = jl.Close() })
		l = jl
	}
	b.s.log.Info("RPC rate limit on", "points", o.Points, "interval", o.Interval, "by", o.By, "block", o.Block)
	return fabric.LimitRPC(l, keyBy, 1, nil), nil
}

// presence turns presence on for the topics whose policy asks for it.
func (b *backend) presence(ctx context.Context) error {
	s := b.s
	topics := s.policies.predicate(func(p *TopicPolicy) bool { return p.Presence })
	if topics == nil {
		return nil
	}
	o := s.opts.Presence
	var store fabric.PresenceStore
	if b.mem != nil {
		store = b.mem.PresenceStore()
	} else if b.red != nil {
		store = b.red.PresenceStore()
	} else {
		js, err := fjs.NewPresenceStore(ctx, b.js, fjs.PresenceStoreOptions{
			Prefix:    s.opts.NATS.SubjectPrefix,
			Replicas:  s.opts.KVReplicas(),
			KeepAlive: o.Heartbeat,
			MarkerTTL: o.Expire,
			Logger:    s.log,
		})
		if err != nil {
			return fmt.Errorf("server: presence store: %w", err)
		}
		b.closers = append(b.closers, func() { _ = js.Close() })
		store = js
	}
	key, sel := s.presenceIdentity() // the token's user id and info when auth is on
	p, err := fabric.NewPresence(ctx, s.node, store, fabric.PresenceOptions{
		HeartbeatInterval: o.Heartbeat,
		ExpireAfter:       o.Expire,
		Topics:            topics,
		Key:               key,
		Select:            sel,
		Logger:            s.log,
	})
	if err != nil {
		return fmt.Errorf("server: presence: %w", err)
	}
	b.pres = p
	// Close leaves for the connections still here, so their users leave
	// everywhere at once; it runs before the store closes.
	b.closers = append(b.closers, func() { p.Close() })
	s.log.Info("presence on", "topics", s.policies.patterns(func(p *TopicPolicy) bool { return p.Presence }))
	return nil
}

// cluster starts the cluster-wide view.
func (b *backend) cluster(ctx context.Context) error {
	if b.red != nil {
		return b.redisCluster(ctx)
	}
	if b.mem != nil {
		c := b.mem.Cluster(b.s.node)
		b.cl = c
		b.closers = append(b.closers, func() { _ = c.Close() })
		return nil
	}
	c, err := fjs.NewCluster(ctx, b.s.node, b.nc, fjs.ClusterOptions{Prefix: b.s.opts.NATS.SubjectPrefix, Logger: b.s.log})
	if err != nil {
		return fmt.Errorf("server: cluster view: %w", err)
	}
	b.cl = c
	b.closers = append(b.closers, func() { _ = c.Close() })
	return nil
}

// postgres starts the Postgres bridge when Options.Postgres.URL is set.
func (b *backend) postgres(ctx context.Context, node *fabric.Node) error {
	o := b.s.opts.Postgres
	if o.URL == "" {
		return nil
	}
	var leases fabric.LeaseStore
	if b.mem != nil {
		leases = b.mem.Leases()
	} else if b.red != nil {
		leases = b.red.Leases()
	} else {
		ls, err := fjs.NewLeaseStore(ctx, b.js, fjs.LeaseOptions{Prefix: b.s.opts.NATS.SubjectPrefix, Replicas: b.s.opts.KVReplicas()})
		if err != nil {
			return fmt.Errorf("server: postgres bridge leases: %w", err)
		}
		leases = ls
	}
	br, err := pgbridge.New(node, leases, pgbridge.Options{URL: o.URL, Notify: o.Notify, Outbox: o.Outbox,
		OutboxTable: o.OutboxTable, Partitions: o.OutboxPartitions, NoMigrate: o.NoMigrate,
		Persist: o.Persist, LeaseTTL: o.LeaseTTL, Logger: b.s.log})
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	b.collect(br)
	if err := br.Start(); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	b.pg = br
	b.closers = append(b.closers, func() { _ = br.Close() }) // before the node and the NATS drain
	return nil
}

// closeExtensions stops presence, the cluster view, the rate limiter and
// the history, last started first.
func (b *backend) closeExtensions() {
	for i := len(b.closers) - 1; i >= 0; i-- {
		b.closers[i]()
	}
	b.closers = nil
}

// close stops the broker, drains the NATS connection (unless ctx is
// done: then closes it) and stops the embedded server.
func (b *backend) close(ctx context.Context) {
	b.closeExtensions()
	if b.brCloser != nil {
		b.brCloser()
	}
	if b.mem != nil {
		_ = b.mem.Close()
	}
	if b.nc != nil && b.ownConn {
		drainConn(ctx, b.nc)
	}
	if b.ns != nil {
		b.ns.Shutdown()
	}
}

// drainConn drains nc within ctx (at most 5s), then closes it.
func drainConn(ctx context.Context, nc *nats.Conn) {
	if ctx.Err() != nil {
		nc.Close()
		return
	}
	done := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(done) })
	if err := nc.Drain(); err != nil {
		nc.Close()
		return
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-done:
	case <-ctx.Done():
		nc.Close()
	case <-t.C:
		nc.Close()
	}
}

// ready checks the backend: NATS connected and JetStream answering.
func (b *backend) ready(ctx context.Context) error {
	if b.red != nil {
		return b.red.Ready(ctx)
	}
	if b.mem != nil {
		return nil
	}
	if st := b.nc.Status(); st != nats.CONNECTED {
		return fmt.Errorf("nats %s", st)
	}
	if _, err := b.js.AccountInfo(ctx); err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	return nil
}

func (b *backend) name() string {
	switch {
	case b == nil:
		return ""
	case b.ns != nil:
		return b.ns.Name()
	case b.nc != nil:
		return b.nc.ConnectedServerName()
	case b.s.node != nil:
		return b.s.node.ID()
	}
	return ""
}

func (b *backend) historyStore() fabric.History { return b.hist }

func (b *backend) presenceTracker() *fabric.Presence { return b.pres }

func (b *backend) clusterView() fabric.ClusterView { return b.cl }

func (b *backend) natsConn() *nats.Conn { return b.nc }

func (b *backend) embedded() *embed.Server { return b.ns }
