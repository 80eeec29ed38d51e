package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/fabricrt/fabric/admission"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/redis"
	"github.com/fabricrt/fabric/sse"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

// Backends accepted by Options.Backend.
const (
	// BackendNATS is NATS with JetStream: the embedded server (the
	// default) or an external deployment (NATSOptions.URL).
	BackendNATS = "nats"
	// BackendMemory is package memory: no NATS at all, one process only.
	// Nothing survives a restart and nothing reaches another process.
	BackendMemory = "memory"
	// BackendRedis is package redis: Redis (or Valkey), a Redis Cluster or
	// a Sentinel-managed Redis at RedisOptions.URL (docs/redis.md).
	BackendRedis = "redis"
)

// Defaults of Options (zero values take these).
const (
	DefaultListen            = "127.0.0.1:8080"
	DefaultMaxPerIP          = 1000
	DefaultWSPath            = "/ws"
	DefaultSSEPath           = "/events"
	DefaultShutdownTimeout   = 30 * time.Second
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultBodyTimeout       = 30 * time.Second
	DefaultWriteTimeout      = 30 * time.Second
	DefaultHTTPIdleTimeout   = 90 * time.Second
	DefaultMaxHeaderBytes    = 64 << 10
	DefaultMaxRequests       = 1024
	DefaultClusterName       = "fabric"
	DefaultRateLimitBy       = "user"
)

// Options configures a Server. The zero value runs what `fabric serve` runs
// with no flags: embedded NATS with JetStream under ./fabric-data, HTTP on
// 127.0.0.1:8080, no persistent topics, no presence, no rate limit.
type Options struct {
	// Backend is BackendNATS (default), BackendRedis or BackendMemory.
	Backend string
	// HTTP configures the listeners and their limits.
	HTTP HTTPOptions
	// NATS configures the NATS backend: naming, and the connection to an
	// external deployment (without URL or Conn the embedded server runs).
	NATS NATSOptions
	// Embed configures the embedded NATS server (used when NATS.URL and
	// NATS.Conn are empty).
	Embed EmbedOptions
	// Redis configures the Redis backend (Backend: BackendRedis).
	Redis RedisOptions
	// WebSocket configures the WebSocket endpoint.
	WebSocket WebSocketOptions
	// SSE configures the Server-Sent Events endpoint.
	SSE SSEOptions
	// Replay configures the history of persistent topics.
	Replay ReplayOptions
	// Presence configures presence (which topics: Topics policies).
	Presence PresenceOptions
	// RateLimit configures the cluster-wide RPC rate limit.
	RateLimit RateLimitOptions
	// Topics are per-pattern policies; the first whose pattern matches a
	// topic decides for it (see TopicPolicy). Replay.Topics,
	// Presence.Topics and ClientPublish add policies (see Policies).
	Topics []TopicPolicy
	// ClientPublish is a shorthand: each pattern adds (or turns on in the
	// policy with that exact pattern) ClientPublish.
	ClientPublish []string
	// Admission sheds load: handshake admission on the WebSocket and SSE
	// endpoints, per-class message rules, the cluster publish-rate
	// aggregator (docs/admission.md).
	Admission AdmissionOptions
	// Pressure configures the node's pressure signals (fabric.PressureOptions;
	// the zero value has the defaults).
	Pressure fabric.PressureOptions
	// Limits bound what one connection can hold or do (fabric.Limits: topics,
	// presence memberships, RPC and inbound rates, refused requests); the
	// zero value has the defaults, a negative value turns one off.
	Limits fabric.Limits
	// Postgres wires the Postgres bridge (docs/pgbridge.md): LISTEN/NOTIFY
	// channels and the transactional outbox onto topics. Off without URL.
	Postgres PostgresOptions
	// NoClusterView turns off the cluster-wide view (Server.Cluster):
	// counts over every instance, messages to a user anywhere, and the
	// API's channels, info, disconnect and unsubscribe. The view costs one
	// NATS subscription per connected (authenticated) user on each
	// instance.
	NoClusterView bool
	// Demo serves the demo page at / (chat, presence and a live counter on
	// fabric.js; package web) and adds what it needs: a first topic policy
	// for demo:* (persistent, presence, client publish), the demo/increment
	// RPC and, without a Connect hook of the application's, one that names
	// connections after their ?name= parameter (for presence; it is not
	// authentication). /fabric.js is served with or without it.
	Demo bool
	// ShutdownTimeout bounds Run's graceful drain once its context ends
	// (default 30s).
	ShutdownTimeout time.Duration
	// Auth turns on JWT authentication and per-topic authorization (see
	// AuthOptions and docs/auth.md); off while it has no key.
	Auth AuthOptions
	// NATSStatus, when set, reports the cluster state of a NATS server that
	// runs outside this Server but is its own (the worker mode's primary
	// process runs it for its workers): /readyz then says what that
	// cluster waits for, as it does for the embedded server.
	NATSStatus func() (embed.Status, bool)

	// Hooks are the application's callbacks into every client session
	// (fabric.Hooks). A client publish must pass the ClientPublish policies
	// (when any policy has ClientPublish) and Hooks.Publish (when set);
	// with neither, clients publish nowhere.
	Hooks fabric.Hooks
	// BeforeExecute runs before every RPC handler, after the rate limit.
	BeforeExecute func(ctx context.Context, call *fabric.Call) error
	// Routes are more HTTP handlers to mount (see Route); Server.Handle
	// mounts more after New, for handlers built from the Node.
	Routes []Route
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// Registerer receives every metric; nil makes a new registry with the
	// Go and process collectors, served at /metrics. One Server per
	// Registerer.
	Registerer prometheus.Registerer
	// Gatherer is what /metrics serves (default: Registerer when it is a
	// prometheus.Gatherer, as *prometheus.Registry is; with neither,
	// there is no /metrics).
	Gatherer prometheus.Gatherer
}

// DefaultHistoryBreaker is AdmissionOptions.HistoryBreaker's default.
const DefaultHistoryBreaker = 5

// AdmissionOptions configures admission control (package admission).
type AdmissionOptions struct {
	// MaxConcurrent caps the connections (every transport) before new
	// upgrades get a fast 503 (0: the open-file limit less a tenth of it,
	// at least 256 descriptors; negative: no cap).
	MaxConcurrent int
	// MaxPerIP caps the connections from one client address (see
	// HTTPOptions.TrustedProxies) before new ones get 429 (0: 1000;
	// negative: no cap). Clients on this host that came directly are not
	// counted.
	MaxPerIP int
	// UpgradeBudget paces accepted upgrades: at most this many per
	// UpgradeTick (0: no pacing).
	UpgradeBudget int
	// UpgradeTick is the pacing window (default 10ms).
	UpgradeTick time.Duration
	// RetryAfter is the Retry-After of a refused upgrade (default 1s).
	RetryAfter time.Duration
	// Classes are the message-tier classes, first match wins: RPC paths or
	// client-publish topics to a rule; a refused call gets OVERLOADED.
	Classes []admission.ClassConfig
	// Aggregator is the cluster-wide publish-rate aggregator.
	Aggregator AggregatorOptions
	// HistoryBreaker opens a circuit breaker around history appends after
	// this many consecutive outages, so that persistent publishes fail fast
	// with 503 while the store is down (0: default 5; negative: off).
	HistoryBreaker int
}

// AggregatorOptions configures the cluster publish-rate aggregator.
type AggregatorOptions struct {
	// Enable turns it on.
	Enable bool
	// Channel is the system topic its envelopes travel on (default
	// __pressure:rates).
	Channel string
	// PublishInterval, StaleAfter and TopN: see admission.AggregatorOptions
	// (defaults 5s, 12s, 20).
	PublishInterval, StaleAfter time.Duration
	TopN                        int
	// SubscriberCounts adds this instance's subscriber counts to its
	// envelopes (Bus.Subscribers then answers cluster-wide).
	SubscriberCounts bool
}

// PostgresOptions configures the Postgres bridge (package pgbridge).
type PostgresOptions struct {
	// URL is the Postgres connection string (postgres://...); empty: no
	// bridge. It may hold a password: it is never logged.
	URL string
	// Notify lists the channels to LISTEN on (default table_changes when
	// Outbox is off); each notification becomes a publish.
	Notify []string
	// Outbox consumes the transactional outbox table.
	Outbox bool
	// OutboxTable names the outbox table (default fabric_outbox).
	OutboxTable string
	// OutboxPartitions is the partition count a new outbox table gets
	// (default 8; an existing table keeps its own).
	OutboxPartitions int
	// NoMigrate leaves the outbox table's creation to the operator.
	NoMigrate bool
	// Persist keeps every bridged message in its topic's history.
	Persist bool
	// LeaseTTL is the lease that makes one instance the listener of a
	// channel (default 3s): a dead holder's channel is unattended for
	// about 4/3 of it.
	LeaseTTL time.Duration
}

// HTTPOptions configures the HTTP listeners. The limits apply to both.
type HTTPOptions struct {
	// Listen is the address of /ws, /api, /healthz, /readyz and /metrics
	// (default 127.0.0.1:8080: loopback only; listening beyond it, such as
	// ":8080", is an explicit choice).
	Listen string
	// Listener, when set, is used instead of listening on Listen (the
	// server closes it).
	Listener net.Listener
	// AdminListen moves /metrics and the API routes to a second listener on
	// this address (default: everything on Listen).
	AdminListen string
	// AdminListener, when set, is used instead of listening on AdminListen.
	AdminListener net.Listener
	// ReusePort sets SO_REUSEPORT so that several processes share the port.
	ReusePort bool
	// APIKey is the bearer key of the HTTP API; without it only loopback
	// clients may call it.
	APIKey string
	// AllowedOrigins is the origin policy of the WebSocket and SSE
	// endpoints: nil or ["same-origin"] accepts an Origin whose host is the
	// request's, ["*"] any, otherwise the origins listed. A request without
	// Origin is refused unless there is a Connect hook or "*".
	AllowedOrigins []string
	// AllowedHosts are the names the server is known by (the Host of its
	// requests, with or without a port): same-origin accepts an Origin
	// only when the Host is one of them, so that a DNS-rebinding page is
	// refused (default: localhost, 127.0.0.1, ::1).
	AllowedHosts []string
	// TrustedProxies are the addresses or CIDR prefixes of reverse proxies
	// whose X-Forwarded-For counts (default none): the client address of
	// rate limits and connections per address, and the loopback rule of
	// the key-less API and protected mode. A request through a proxy is
	// never local.
	TrustedProxies []string
	// TLSCert and TLSKey serve HTTPS and WSS with this certificate and key
	// (PEM files); Reload (SIGHUP) re-reads them, open connections keep
	// theirs.
	TLSCert, TLSKey string
	// ReadHeaderTimeout bounds reading a request's headers (default 10s).
	ReadHeaderTimeout time.Duration
	// BodyTimeout bounds reading a request's body, from the end of its
	// headers (default 30s). Streaming routes (WebSocket, SSE) have none.
	BodyTimeout time.Duration
	// WriteTimeout bounds writing a response, from the end of the request's
	// headers (default 30s). Streaming routes have none.
	WriteTimeout time.Duration
	// IdleTimeout closes a keep-alive connection that waits this long for
	// its next request (default 90s).
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's headers (default 64 KiB).
	MaxHeaderBytes int
	// MaxRequests bounds the requests in flight on each listener (default
	// 1024; negative: no bound). Past it a request gets 503 with
	// Retry-After at once. Streaming routes and /healthz, /readyz are not
	// counted.
	MaxRequests int
}

// NATSOptions configures the NATS backend.
type NATSOptions struct {
	// URL connects to this NATS deployment instead of running the embedded
	// server (comma-separated URLs of one cluster).
	URL string
	// Creds is a credentials (.creds) file.
	Creds string
	// Nkey is an nkey seed file.
	Nkey string
	// Token is an authentication token.
	Token string
	// TLSCert and TLSKey are a client certificate and key (PEM).
	TLSCert, TLSKey string
	// TLSCA is a CA bundle to verify the server (PEM).
	TLSCA string
	// Conn, when set, is used instead of connecting (Go only); the caller
	// keeps owning it.
	Conn *nats.Conn
	// SubjectPrefix is the first token of every Fabric subject, bucket and
	// stream (default "fabric"); it isolates tenants sharing a deployment.
	SubjectPrefix string
	// KVReplicas is the replication of the presence, rate-limit and lease
	// state (0, the default: min(3, the cluster size); see
	// Options.KVReplicas).
	KVReplicas int
}

// RedisOptions configures the Redis backend (package redis).
type RedisOptions struct {
	// URL is the Redis address (required with BackendRedis):
	// redis://[user:password@]host:port[/db], rediss:// for TLS; more
	// Redis Cluster nodes as ?addr=host:port (repeated); Sentinels as
	// addresses with ?master_set=NAME. It may hold a password: it is
	// never logged.
	URL string
	// Prefix starts every key and channel (default "fabric"); it isolates
	// tenants sharing a Redis.
	Prefix string
	// Partitions is how many hash tags keys and channels are spread over
	// (default 16; every instance must use the same).
	Partitions int
	// Sharded is sharded pub/sub: "auto" (default: on Redis Cluster),
	// "on" or "off".
	Sharded string
}

// EmbedOptions configures the embedded NATS server.
type EmbedOptions struct {
	// DataDir holds the JetStream store and the instance lock (default
	// ./fabric-data; one instance per directory).
	DataDir string
	// Name is the server name, unique in a cluster (default: generated once
	// and kept in DataDir).
	Name string
	// Listen opens a NATS client port on this address (none by default).
	Listen string
	// Monitor opens nats-server's HTTP monitoring on this address (none by
	// default).
	Monitor string
	// ClusterName is the NATS cluster name shared by the instances (default
	// "fabric").
	ClusterName string
	// ClusterListen is where peers route to, such as 0.0.0.0:6222.
	ClusterListen string
	// Routes are the peers' cluster URLs (nats://host:6222).
	Routes []string
	// LeafRemotes attach the server as a leaf node to these leafnode URLs.
	LeafRemotes []string
	// LeafCreds is a credentials file for the leaf connection.
	LeafCreds string
	// LeafListen accepts leaf nodes on this address (act as a hub).
	LeafListen string
	// GatewayListen accepts gateway connections from the other clusters of
	// a supercluster on this address, such as 0.0.0.0:7222 (ClusterName
	// is this cluster's name in it; every instance of the cluster needs it).
	GatewayListen string
	// Gateways are the other clusters of the supercluster, "name=url" each
	// (nats://host:7222; a name may repeat to give more URLs).
	Gateways []string
	// JSDomain is the JetStream domain (default with LeafRemotes: the
	// server name).
	JSDomain string
	// SyncAlways fsyncs JetStream writes before acknowledging them.
	SyncAlways bool
}

// WebSocketOptions configures the WebSocket endpoint (package wsedge).
type WebSocketOptions struct {
	// Path is the endpoint's path (default /ws).
	Path string
	// MaxPayload is the largest client message in bytes (default 16 KiB);
	// a larger one closes the connection with 1009.
	MaxPayload int
	// IdleTimeout closes connections silent this long (default 120s; pings
	// keep healthy ones alive; negative: never).
	IdleTimeout time.Duration
	// MaxBackpressure is the bytes queued per connection before its
	// messages are dropped (default 1 MiB).
	MaxBackpressure int
	// UpgradeTimeout bounds the Connect hook (default 10s).
	UpgradeTimeout time.Duration
	// Compression negotiates permessage-deflate.
	Compression bool
	// GoroutinePerConn reads each connection with its own goroutine
	// instead of epoll.
	GoroutinePerConn bool
}

// SSEOptions configures the Server-Sent Events endpoint (package sse):
// GET streams a client's topics, POST carries its protocol frames.
type SSEOptions struct {
	// Disable turns the endpoint off.
	Disable bool
	// Path is the endpoint's path (default /events).
	Path string
	// Heartbeat is how often an idle stream gets a comment line (default
	// 15s).
	Heartbeat time.Duration
	// WriteTimeout cuts a stream whose client takes no write for this long
	// (default 10s).
	WriteTimeout time.Duration
	// MaxBackpressure is the bytes queued per stream before its messages
	// are dropped (default 1 MiB).
	MaxBackpressure int
	// MaxTopics bounds the topics one stream may name (default 64).
	MaxTopics int
}

// ReplayOptions configures the history of persistent topics.
type ReplayOptions struct {
	// Topics is a shorthand: each pattern adds (or turns on in the policy
	// with that exact pattern) Persistent.
	Topics []string
	// MaxPerTopic is how many messages each persistent topic keeps (default
	// 200).
	MaxPerTopic int
	// MaxAge drops history older than this (default 0: kept until pushed
	// out by newer messages).
	MaxAge time.Duration
	// Replicas is the history streams' replication (0, the default: min(3,
	// the cluster size that Embed.Routes give); see Options.HistoryReplicas).
	Replicas int
}

// PresenceOptions configures presence.
type PresenceOptions struct {
	// Topics is a shorthand: each pattern adds (or turns on in the policy
	// with that exact pattern) Presence.
	Topics []string
	// Heartbeat is how often presence entries are refreshed and heartbeat
	// events sent (default 15s).
	Heartbeat time.Duration
	// Expire is how long a dead instance's users stay (default 30s, whole
	// seconds).
	Expire time.Duration
}

// RateLimitOptions configures the cluster-wide RPC rate limit; it is off
// while Points is 0.
type RateLimitOptions struct {
	// Points is how many RPC calls each key may make per Interval.
	Points int
	// Interval is the refill period (default 10s when Points is set).
	Interval time.Duration
	// By is the key: "ip", "connection" or "user" (default; anonymous
	// users count by connection).
	By string
	// Block bans a key this long once it has used up its points (0: no
	// ban).
	Block time.Duration
}

// TopicPolicy is what a server does with the topics matching Pattern.
type TopicPolicy struct {
	// Pattern is a glob: '*' stands for any run of characters ("chat:*").
	Pattern string
	// Persistent keeps every message in the history: messages carry seq,
	// and clients resume from it after a drop.
	Persistent bool
	// ReplayMaxPerTopic is how many messages each matching topic keeps
	// (0: Replay.MaxPerTopic).
	ReplayMaxPerTopic int
	// ReplayMaxAge drops the matching topics' messages older than this
	// (0: Replay.MaxAge).
	ReplayMaxAge time.Duration
	// Presence makes subscribers join the topic's presence.
	Presence bool
	// ClientPublish lets clients publish to the topic (fabric/publish).
	ClientPublish bool
	// Read is who may read the topic (subscribe, history, presence) when
	// authentication is on (Options.Auth): ReadToken (the default there:
	// the token's subscribe patterns), ReadPublic (anyone) or ReadUser
	// (per-user topics: the pattern holds ${sub}, such as "user:${sub}",
	// and only the user whose id stands there reads). ${sub} in any
	// pattern matches like '*' when choosing the policy.
	Read string
}

// Route is an HTTP handler mounted on a Server.
type Route struct {
	// Pattern is a net/http.ServeMux pattern ("/events", "GET /x/{id}").
	Pattern string
	// Handler serves the route.
	Handler http.Handler
	// Admin puts the route on the admin listener when HTTP.AdminListen is
	// set (metrics and APIs); otherwise it is on the main one.
	Admin bool
	// Stream marks a long-lived route (WebSocket, SSE): no body or write
	// deadline, not counted in HTTP.MaxRequests, and its request contexts
	// are cancelled when the server drains (once Shutdown has returned).
	Stream bool
	// Shutdown, if set, runs when the server drains, alongside the HTTP
	// shutdown: a Stream route closes its streams gracefully here (SSE's
	// and the WebSocket edge's Shutdown send 1001).
	Shutdown func(ctx context.Context) error
}

// withDefaults returns o with every zero value replaced by its default.
func (o Options) withDefaults() Options {
	if o.Backend == "" {
		o.Backend = BackendNATS
	}
	h := &o.HTTP
	if h.Listen == "" {
		h.Listen = DefaultListen
	}
	a := &o.Admission
	if a.MaxPerIP == 0 {
		a.MaxPerIP = DefaultMaxPerIP
	}
	setDur(&a.UpgradeTick, fabric.DefaultUpgradeTick)
	setDur(&a.RetryAfter, fabric.DefaultUpgradeRetryAfter)
	if a.HistoryBreaker == 0 {
		a.HistoryBreaker = DefaultHistoryBreaker
	}
	if a.Aggregator.Channel == "" {
		a.Aggregator.Channel = admission.DefaultChannel
	}
	setDur(&a.Aggregator.PublishInterval, admission.DefaultPublishInterval)
	setDur(&a.Aggregator.StaleAfter, admission.DefaultStaleAfter)
	setInt(&a.Aggregator.TopN, admission.DefaultTopN)
	p := &o.Pressure
	if p.SampleInterval == 0 {
		p.SampleInterval = fabric.DefaultPressureSampleInterval
	}
	if p.MemoryRatio == 0 {
		p.MemoryRatio = fabric.DefaultPressureMemoryRatio
	}
	if p.PublishRate == 0 {
		p.PublishRate = fabric.DefaultPressurePublishRate
	}
	if p.MaxSubscriptions == 0 {
		p.MaxSubscriptions = fabric.DefaultPressureMaxSubscriptions
	}
	setDur(&h.ReadHeaderTimeout, DefaultReadHeaderTimeout)
	setDur(&h.BodyTimeout, DefaultBodyTimeout)
	setDur(&h.WriteTimeout, DefaultWriteTimeout)
	setDur(&h.IdleTimeout, DefaultHTTPIdleTimeout)
	setInt(&h.MaxHeaderBytes, DefaultMaxHeaderBytes)
	if h.MaxRequests == 0 {
		h.MaxRequests = DefaultMaxRequests
	}
	if o.NATS.SubjectPrefix == "" {
		o.NATS.SubjectPrefix = fjs.DefaultPrefix
	}
	if o.Redis.Prefix == "" {
		o.Redis.Prefix = redis.DefaultPrefix
	}
	setInt(&o.Redis.Partitions, redis.DefaultPartitions)
	if o.Redis.Sharded == "" {
		o.Redis.Sharded = "auto"
	}
	if o.Embed.DataDir == "" {
		o.Embed.DataDir = embed.DefaultDataDir
	}
	if o.Embed.ClusterName == "" {
		o.Embed.ClusterName = DefaultClusterName
	}
	if len(h.AllowedOrigins) == 0 {
		h.AllowedOrigins = []string{"same-origin"}
	}
	w := &o.WebSocket
	if w.Path == "" {
		w.Path = DefaultWSPath
	}
	setInt(&w.MaxPayload, wsedge.DefaultMaxPayloadLength)
	if w.IdleTimeout == 0 {
		w.IdleTimeout = wsedge.DefaultIdleTimeout
	}
	setInt(&w.MaxBackpressure, wsedge.DefaultMaxBackpressure)
	setDur(&w.UpgradeTimeout, fabric.DefaultConnectTimeout)
	e := &o.SSE
	if e.Path == "" {
		e.Path = DefaultSSEPath
	}
	setDur(&e.Heartbeat, sse.DefaultHeartbeat)
	setDur(&e.WriteTimeout, sse.DefaultWriteTimeout)
	setInt(&e.MaxBackpressure, sse.DefaultMaxBackpressure)
	setInt(&e.MaxTopics, sse.DefaultMaxTopics)
	setInt(&o.Replay.MaxPerTopic, fjs.DefaultMaxPerTopic)
	setDur(&o.Presence.Heartbeat, fabric.DefaultPresenceHeartbeat)
	setDur(&o.Presence.Expire, fabric.DefaultPresenceExpiry)
	if o.RateLimit.By == "" {
		o.RateLimit.By = DefaultRateLimitBy
	}
	if o.RateLimit.Points > 0 && o.RateLimit.Interval <= 0 {
		o.RateLimit.Interval = 10 * time.Second
	}
	setDur(&o.ShutdownTimeout, DefaultShutdownTimeout)
	o.Auth.withDefaults()
	return o
}

// Defaults returns the zero Options with every default filled in: what
// New runs when given Options{} (the CLI shows these as its defaults).
func Defaults() Options { return Options{}.withDefaults() }

func setDur(p *time.Duration, d time.Duration) {
	if *p <= 0 {
		*p = d
	}
}

func setInt(p *int, d int) {
	if *p <= 0 {
		*p = d
	}
}

// validate reports the first setting that cannot work.
func (o *Options) validate() error {
	switch o.Backend {
	case BackendNATS, BackendMemory, BackendRedis:
	default:
		return fmt.Errorf("backend %q: want %q, %q or %q", o.Backend, BackendNATS, BackendRedis, BackendMemory)
	}
	if o.Backend == BackendRedis && o.Redis.URL == "" {
		return fmt.Errorf("backend %q: a Redis URL is required (--redis-url)", o.Backend)
	}
	if o.Backend == BackendRedis && (o.NATS.URL != "" || o.NATS.Conn != nil) {
		return fmt.Errorf("backend %q: a NATS URL or connection makes no sense with it", o.Backend)
	}
	if o.Replay.MaxAge < 0 {
		return fmt.Errorf("replay max age %s: must not be negative", o.Replay.MaxAge)
	}
	if o.RateLimit.Points < 0 {
		return fmt.Errorf("rate limit points %d: must not be negative", o.RateLimit.Points)
	}
	if _, ok := fabric.KeyByName(o.RateLimit.By); !ok {
		return fmt.Errorf("rate limit by %q: want ip, connection or user", o.RateLimit.By)
	}
	if o.Presence.Heartbeat >= o.Presence.Expire {
		return fmt.Errorf("presence heartbeat %s must be shorter than presence expire %s", o.Presence.Heartbeat, o.Presence.Expire)
	}
	if o.WebSocket.Path[0] != '/' {
		return fmt.Errorf("websocket path %q: must start with /", o.WebSocket.Path)
	}
	if !o.SSE.Disable && (o.SSE.Path[0] != '/' || o.SSE.Path == o.WebSocket.Path) {
		return fmt.Errorf("sse path %q: must start with / and differ from the websocket path", o.SSE.Path)
	}
	if o.Backend == BackendMemory && (o.NATS.URL != "" || o.NATS.Conn != nil) {
		return errors.New("backend memory: a NATS URL or connection makes no sense with it")
	}
	if _, err := o.gateways(); err != nil {
		return err
	}
	if err := o.validateAuth(); err != nil {
		return err
	}
	if err := o.validateExposure(); err != nil {
		return err
	}
	if _, err := o.proxyPolicy(); err != nil {
		return err
	}
	if (o.HTTP.TLSCert == "") != (o.HTTP.TLSKey == "") {
		return errors.New("tls: a certificate needs its key and a key its certificate (--tls-cert and --tls-key)")
	}
	_, err := o.Policies()
	return err
}
