package main

import (
	"strings"
	"time"

	"github.com/fabricrt/fabric/admission"

	"github.com/fabricrt/fabric/server"
)

// serveConfig is everything `fabric serve` can be told: the server's
// options and what only the command has (logging, the config file).
type serveConfig struct {
	server.Options
	ConfigFile string
	LogLevel   string
	LogFormat  string
	Workers    workerSettings // workers.go: worker mode
}

// newServeConfig returns the defaults: the server's own, so that the
// command and the library agree.
func newServeConfig() *serveConfig {
	return &serveConfig{Options: server.Defaults(), LogLevel: "info", LogFormat: "text", Workers: defaultWorkerSettings()}
}

// setting is one row of the table that drives the flags, their FABRIC_*
// environment twins, the config file's keys and docs/config.md.
type setting struct {
	group string // help section
	key   string // config file key, dotted ("http.listen"); "" for command-line-only settings
	flag  string // command-line flag (its env twin is envName(flag))
	usage string
	bind  func(c *serveConfig) value
}

// env returns the setting's environment variable.
func (s *setting) env() string { return envName(s.flag) }

func envName(flagName string) string {
	return "FABRIC_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func str(f func(c *serveConfig) *string) func(*serveConfig) value {
	return func(c *serveConfig) value { return strValue{f(c)} }
}

func num(f func(c *serveConfig) *int) func(*serveConfig) value {
	return func(c *serveConfig) value { return intValue{f(c)} }
}

func boolean(f func(c *serveConfig) *bool) func(*serveConfig) value {
	return func(c *serveConfig) value { return boolValue{f(c)} }
}

func float(f func(c *serveConfig) *float64) func(*serveConfig) value {
	return func(c *serveConfig) value { return floatValue{f(c)} }
}

func num64(f func(c *serveConfig) *int64) func(*serveConfig) value {
	return func(c *serveConfig) value { return int64Value{f(c)} }
}

func dur(f func(c *serveConfig) *time.Duration) func(*serveConfig) value {
	return func(c *serveConfig) value { return durValue{f(c)} }
}

func list(f func(c *serveConfig) *[]string) func(*serveConfig) value {
	return func(c *serveConfig) value { return listValue{f(c)} }
}

// Help sections, in order.
const (
	gServer   = "Server"
	gHTTP     = "HTTP"
	gTopics   = "Topic policies (shorthands; a config file has a topics table)"
	gReplay   = "Replay (history of persistent topics)"
	gPresence = "Presence"
	gAuth     = "Authentication (JWT; docs/auth.md)"
	gRate     = "Rate limits"
	gWS       = "WebSocket"
	gSSE      = "Server-Sent Events"
	gEmbed    = "Embedded NATS (the default backend)"
	gNATS     = "NATS (external deployment, naming)"
	gRedis    = "Redis (--backend redis; docs/redis.md)"
	gPG       = "Postgres bridge (docs/pgbridge.md)"
	gAdmit    = "Admission control (docs/admission.md; classes: config file only)"
	gPressure = "Pressure signals (docs/admission.md)"
	gLimits   = "Per-connection limits (docs/security.md)"
)

// settings is the table. Order is help order.
var settings = []setting{
	{gServer, "", "config", "YAML config file with any of the keys below (see docs/config.md)", str(func(c *serveConfig) *string { return &c.ConfigFile })},
	{gServer, "backend", "backend", "nats (embedded or external NATS with JetStream), redis (Redis or Valkey at --redis-url) or memory (one process only, nothing persists)", str(func(c *serveConfig) *string { return &c.Backend })},
	{gServer, "shutdown_timeout", "shutdown-timeout", "on SIGTERM/SIGINT, how long to drain before exiting", dur(func(c *serveConfig) *time.Duration { return &c.ShutdownTimeout })},
	{gServer, "log.level", "log-level", "debug, info, warn or error", str(func(c *serveConfig) *string { return &c.LogLevel })},
	{gServer, "log.format", "log-format", "text or json", str(func(c *serveConfig) *string { return &c.LogFormat })},
	{gServer, "no_cluster_view", "no-cluster-view", "turn off cluster-wide counts, messages to a user on any instance and the API's channels/info/disconnect/unsubscribe (saves one NATS subscription per connected user)", boolean(func(c *serveConfig) *bool { return &c.NoClusterView })},
	{gServer, "demo", "demo", "serve the demo page at / (chat, presence, a live counter on fabric.js; adds a demo:* topic policy and names connections after ?name=, which is not authentication)", boolean(func(c *serveConfig) *bool { return &c.Demo })},

	{gWorkers, "workers.count", "workers", "run N worker processes sharing the HTTP port under a primary that runs the embedded NATS and restarts them (--workers alone: one per CPU; 0: off; SIGHUP replaces them one by one)", workerCount(func(c *serveConfig) *int { return &c.Workers.Count })},
	{gWorkers, "workers.health_interval", "worker-health-interval", "how often the primary checks each worker", dur(func(c *serveConfig) *time.Duration { return &c.Workers.HealthInterval })},
	{gWorkers, "workers.health_timeout", "worker-health-timeout", "a worker that leaves a check unanswered this long is killed and restarted", dur(func(c *serveConfig) *time.Duration { return &c.Workers.HealthTimeout })},
	{gWorkers, "workers.drain_grace", "worker-drain-grace", "a stopping worker stops accepting, then waits this long for the requests it accepted before it refuses new streams", dur(func(c *serveConfig) *time.Duration { return &c.Workers.DrainGrace })},

	{gHTTP, "http.listen", "listen", "HTTP address for /ws, /api, /healthz, /readyz, /metrics (loopback by default: use :8080 to listen everywhere)", str(func(c *serveConfig) *string { return &c.HTTP.Listen })},
	{gHTTP, "http.admin_listen", "admin-listen", "serve /metrics and /api on this second address instead (none by default)", str(func(c *serveConfig) *string { return &c.HTTP.AdminListen })},
	{gHTTP, "http.reuseport", "reuseport", "set SO_REUSEPORT so several processes share the port", boolean(func(c *serveConfig) *bool { return &c.HTTP.ReusePort })},
	{gHTTP, "http.api_key", "api-key", "bearer key for the HTTP API; without it only loopback clients may publish", str(func(c *serveConfig) *string { return &c.HTTP.APIKey })},
	{gHTTP, "http.allowed_origins", "allowed-origins", "origins the WebSocket and SSE endpoints accept: same-origin, * or a comma-separated list", list(func(c *serveConfig) *[]string { return &c.HTTP.AllowedOrigins })},
	{gHTTP, "http.allowed_hosts", "allowed-hosts", "names the server is known by, comma separated: same-origin holds only when the request's Host is one (DNS rebinding); default localhost, 127.0.0.1, ::1", list(func(c *serveConfig) *[]string { return &c.HTTP.AllowedHosts })},
	{gHTTP, "http.trusted_proxies", "trusted-proxies", "reverse proxies (addresses or CIDRs, comma separated) whose X-Forwarded-For gives the client address; a proxied request is never local", list(func(c *serveConfig) *[]string { return &c.HTTP.TrustedProxies })},
	{gHTTP, "http.tls_cert", "tls-cert", "serve HTTPS and WSS with this certificate (PEM; SIGHUP re-reads it)", str(func(c *serveConfig) *string { return &c.HTTP.TLSCert })},
	{gHTTP, "http.tls_key", "tls-key", "the certificate's key (PEM)", str(func(c *serveConfig) *string { return &c.HTTP.TLSKey })},
	{gHTTP, "http.read_header_timeout", "read-header-timeout", "bound on reading a request's headers", dur(func(c *serveConfig) *time.Duration { return &c.HTTP.ReadHeaderTimeout })},
	{gHTTP, "http.body_timeout", "body-timeout", "bound on reading a request's body (not WebSocket or SSE streams)", dur(func(c *serveConfig) *time.Duration { return &c.HTTP.BodyTimeout })},
	{gHTTP, "http.write_timeout", "write-timeout", "bound on writing a response (not WebSocket or SSE streams)", dur(func(c *serveConfig) *time.Duration { return &c.HTTP.WriteTimeout })},
	{gHTTP, "http.idle_timeout", "http-idle-timeout", "close keep-alive connections idle this long between requests", dur(func(c *serveConfig) *time.Duration { return &c.HTTP.IdleTimeout })},
	{gHTTP, "http.max_header_bytes", "max-header-bytes", "largest request header block in bytes", num(func(c *serveConfig) *int { return &c.HTTP.MaxHeaderBytes })},
	{gHTTP, "http.max_requests", "max-requests", "requests in flight per listener before the next get 503 with Retry-After (streams and probes aside; negative: no bound)", num(func(c *serveConfig) *int { return &c.HTTP.MaxRequests })},

	{gTopics, "", "replay", "persistent topics, comma-separated globs such as chat:*: adds topic policies with persistent: true", list(func(c *serveConfig) *[]string { return &c.Replay.Topics })},
	{gTopics, "", "presence", "topics with presence, comma-separated globs such as room:*: adds topic policies with presence: true", list(func(c *serveConfig) *[]string { return &c.Presence.Topics })},
	{gTopics, "", "client-publish", "topics clients may publish to (fabric/publish RPC), comma-separated globs: adds topic policies with client_publish: true", list(func(c *serveConfig) *[]string { return &c.ClientPublish })},

	{gReplay, "replay.max_per_topic", "replay-max-per-topic", "messages kept per persistent topic (a topic policy may say otherwise)", num(func(c *serveConfig) *int { return &c.Replay.MaxPerTopic })},
	{gReplay, "replay.max_age", "replay-max-age", "drop history older than this, such as 24h (0: keep until pushed out by newer messages)", dur(func(c *serveConfig) *time.Duration { return &c.Replay.MaxAge })},
	{gReplay, "replay.replicas", "replay-replicas", "replicas of the history streams (0: min(3, cluster size), the size counted from --routes)", num(func(c *serveConfig) *int { return &c.Replay.Replicas })},

	{gPresence, "presence.heartbeat", "presence-heartbeat", "how often presence entries are refreshed and heartbeat events sent", dur(func(c *serveConfig) *time.Duration { return &c.Presence.Heartbeat })},
	{gPresence, "presence.expire", "presence-expire", "a dead instance's users leave after at most this long (whole seconds)", dur(func(c *serveConfig) *time.Duration { return &c.Presence.Expire })},

	{gAuth, "auth.secrets", "jwt-secret", "HMAC secrets that sign tokens (HS256; HS384/HS512 for 48/64 bytes or more), at least 32 bytes each, comma separated (turns authentication on; better in the environment than on the command line)", list(func(c *serveConfig) *[]string { return &c.Auth.Secrets })},
	{gAuth, "auth.key_files", "jwt-key-file", "public key files (PEM keys or certificates, or a JWK Set) for RS*, PS*, ES* and EdDSA tokens, comma separated; re-read on SIGHUP (turns authentication on)", list(func(c *serveConfig) *[]string { return &c.Auth.KeyFiles })},
	{gAuth, "auth.jwks_file", "jwks-file", "JWK Set file, keys picked by kid; re-read on SIGHUP: rotate by adding the new key, then removing the old (turns authentication on)", str(func(c *serveConfig) *string { return &c.Auth.JWKSFile })},
	{gAuth, "auth.issuer", "jwt-issuer", "required iss of every token (none by default)", str(func(c *serveConfig) *string { return &c.Auth.Issuer })},
	{gAuth, "auth.audience", "jwt-audience", "a token's aud must hold one of these, comma separated (none by default)", list(func(c *serveConfig) *[]string { return &c.Auth.Audience })},
	{gAuth, "auth.cookie", "jwt-cookie", "cookie a token may come in (also: Authorization: Bearer, the token query parameter)", str(func(c *serveConfig) *string { return &c.Auth.Cookie })},
	{gAuth, "auth.claim", "jwt-claim", "claim carrying the permissions (subscribe, publish, rpc) and the presence info", str(func(c *serveConfig) *string { return &c.Auth.Claim })},
	{gAuth, "auth.leeway", "jwt-leeway", "clock skew tolerated on exp, nbf and iat (negative: none)", dur(func(c *serveConfig) *time.Duration { return &c.Auth.Leeway })},
	{gAuth, "auth.exp_optional", "jwt-exp-optional", "accept tokens without exp (they never expire)", boolean(func(c *serveConfig) *bool { return &c.Auth.ExpOptional })},
	{gAuth, "auth.allow_anonymous", "allow-anonymous", "serve clients without a token on purpose: beyond loopback with no keys (protected mode off), or next to JWT auth (they read topics whose policy has read: public); said at start and on /readyz", boolean(func(c *serveConfig) *bool { return &c.Auth.AllowAnonymous })},

	{gRate, "rate_limit.rpc", "rpc-rate-limit", "limit RPC calls per key across the cluster: POINTS/INTERVAL such as 30/10s (off when empty)", func(c *serveConfig) value {
		return rateValue{&c.RateLimit.Points, &c.RateLimit.Interval}
	}},
	{gRate, "rate_limit.by", "rate-limit-by", "key of the RPC rate limit: ip, connection or user (anonymous users: their connection)", str(func(c *serveConfig) *string { return &c.RateLimit.By })},
	{gRate, "rate_limit.block", "rate-limit-block", "ban a key this long once it has used up the RPC rate limit (0: no ban)", dur(func(c *serveConfig) *time.Duration { return &c.RateLimit.Block })},

	{gWS, "websocket.path", "ws-path", "path of the WebSocket endpoint", str(func(c *serveConfig) *string { return &c.WebSocket.Path })},
	{gWS, "websocket.max_payload", "max-payload", "largest client message in bytes (larger closes with 1009)", num(func(c *serveConfig) *int { return &c.WebSocket.MaxPayload })},
	{gWS, "websocket.idle_timeout", "idle-timeout", "close connections silent this long (pings keep healthy ones alive)", dur(func(c *serveConfig) *time.Duration { return &c.WebSocket.IdleTimeout })},
	{gWS, "websocket.max_backpressure", "max-backpressure", "bytes queued per connection before its messages are dropped", num(func(c *serveConfig) *int { return &c.WebSocket.MaxBackpressure })},
	{gWS, "websocket.upgrade_timeout", "upgrade-timeout", "bound on the connect hook", dur(func(c *serveConfig) *time.Duration { return &c.WebSocket.UpgradeTimeout })},
	{gWS, "websocket.compression", "compression", "negotiate permessage-deflate", boolean(func(c *serveConfig) *bool { return &c.WebSocket.Compression })},
	{gWS, "websocket.goroutine_per_conn", "goroutine-per-conn", "read each connection with its own goroutine instead of epoll", boolean(func(c *serveConfig) *bool { return &c.WebSocket.GoroutinePerConn })},

	{gSSE, "sse.disable", "sse-disable", "turn the SSE endpoint off", boolean(func(c *serveConfig) *bool { return &c.SSE.Disable })},
	{gSSE, "sse.path", "sse-path", "path of the SSE endpoint (GET streams, POST sends frames)", str(func(c *serveConfig) *string { return &c.SSE.Path })},
	{gSSE, "sse.heartbeat", "sse-heartbeat", "comment line sent on idle streams this often, for proxies", dur(func(c *serveConfig) *time.Duration { return &c.SSE.Heartbeat })},
	{gSSE, "sse.write_timeout", "sse-write-timeout", "cut a stream whose client takes no write for this long", dur(func(c *serveConfig) *time.Duration { return &c.SSE.WriteTimeout })},
	{gSSE, "sse.max_backpressure", "sse-max-backpressure", "bytes queued per stream before its messages are dropped", num(func(c *serveConfig) *int { return &c.SSE.MaxBackpressure })},
	{gSSE, "sse.max_topics", "sse-max-topics", "most topics one stream may name", num(func(c *serveConfig) *int { return &c.SSE.MaxTopics })},

	{gAdmit, "admission.max_concurrent", "max-connections", "connections (every transport) before new upgrades get a fast 503 (0: the open-file limit less a tenth, at least 256 spare; negative: no cap)", num(func(c *serveConfig) *int { return &c.Admission.MaxConcurrent })},
	{gAdmit, "admission.max_per_ip", "max-connections-per-ip", "connections from one client address before new ones get 429 (negative: no cap; local clients not counted)", num(func(c *serveConfig) *int { return &c.Admission.MaxPerIP })},
	{gAdmit, "admission.upgrade_budget", "upgrade-budget", "accepted upgrades per --upgrade-tick before the next get 503 (0: no pacing)", num(func(c *serveConfig) *int { return &c.Admission.UpgradeBudget })},
	{gAdmit, "admission.upgrade_tick", "upgrade-tick", "the upgrade pacing window", dur(func(c *serveConfig) *time.Duration { return &c.Admission.UpgradeTick })},
	{gAdmit, "admission.retry_after", "upgrade-retry-after", "Retry-After of a refused upgrade", dur(func(c *serveConfig) *time.Duration { return &c.Admission.RetryAfter })},
	{gAdmit, "admission.history_breaker", "history-breaker", "consecutive history outages before persistent publishes fail fast for a while (negative: off)", num(func(c *serveConfig) *int { return &c.Admission.HistoryBreaker })},
	{gAdmit, "aggregator.enable", "publish-rate-aggregator", "share this instance's top publishers with the cluster (the cluster_top_publisher rule needs it)", boolean(func(c *serveConfig) *bool { return &c.Admission.Aggregator.Enable })},
	{gAdmit, "aggregator.channel", "aggregator-channel", "system topic the aggregator's envelopes travel on (per tenant)", str(func(c *serveConfig) *string { return &c.Admission.Aggregator.Channel })},
	{gAdmit, "aggregator.publish_interval", "aggregator-interval", "how often this instance broadcasts its slice", dur(func(c *serveConfig) *time.Duration { return &c.Admission.Aggregator.PublishInterval })},
	{gAdmit, "aggregator.stale_after", "aggregator-stale-after", "drop an instance's slice after this long without a fresher one", dur(func(c *serveConfig) *time.Duration { return &c.Admission.Aggregator.StaleAfter })},
	{gAdmit, "aggregator.top_n", "aggregator-top-n", "cap on each slice and on the merged top publishers", num(func(c *serveConfig) *int { return &c.Admission.Aggregator.TopN })},
	{gAdmit, "aggregator.subscriber_counts", "aggregator-subscriber-counts", "add this instance's subscriber counts to its envelopes", boolean(func(c *serveConfig) *bool { return &c.Admission.Aggregator.SubscriberCounts })},

	{gPressure, "pressure.sample_interval", "pressure-interval", "how often the pressure signals are sampled (negative: off)", dur(func(c *serveConfig) *time.Duration { return &c.Pressure.SampleInterval })},
	{gPressure, "pressure.memory_limit", "pressure-memory-limit", "bytes MEMORY is measured against (0: GOMEMLIMIT, else the cgroup limit, else physical memory)", num64(func(c *serveConfig) *int64 { return &c.Pressure.MemoryLimit })},
	{gPressure, "pressure.memory_ratio", "pressure-memory-ratio", "MEMORY fires at this fraction of the limit", float(func(c *serveConfig) *float64 { return &c.Pressure.MemoryRatio })},
	{gPressure, "pressure.memory_source", "pressure-memory-source", "rss (the process) or go (what the Go runtime holds); default rss where /proc has it", str(func(c *serveConfig) *string { return &c.Pressure.MemorySource })},
	{gPressure, "pressure.publish_rate", "pressure-publish-rate", "PUBLISH_RATE fires at this many publishes per second on this instance", float(func(c *serveConfig) *float64 { return &c.Pressure.PublishRate })},
	{gPressure, "pressure.max_subscriptions", "pressure-max-subscriptions", "SUBSCRIBERS fires at this many (connection, topic) subscriptions", num(func(c *serveConfig) *int { return &c.Pressure.MaxSubscriptions })},

	{gLimits, "limits.max_topics", "max-topics-per-conn", "topics one connection may subscribe to (0: 1000; negative: no limit)", num(func(c *serveConfig) *int { return &c.Limits.MaxTopics })},
	{gLimits, "limits.max_presence", "max-presence-per-conn", "presence memberships one connection may hold (0: 100)", num(func(c *serveConfig) *int { return &c.Limits.MaxPresence })},
	{gLimits, "limits.rpc_rate", "rpc-rate", "RPC calls (client publishes included) per second per connection (0: 100; negative: none); past it RATE_LIMITED", float(func(c *serveConfig) *float64 { return &c.Limits.RPCRate })},
	{gLimits, "limits.rpc_burst", "rpc-burst", "RPC calls a connection may make at once (0: 200)", num(func(c *serveConfig) *int { return &c.Limits.RPCBurst })},
	{gLimits, "limits.frame_rate", "frame-rate", "frames per second per connection (0: 500; negative: none); past it the connection is closed with 4429", float(func(c *serveConfig) *float64 { return &c.Limits.FrameRate })},
	{gLimits, "limits.frame_burst", "frame-burst", "frames a connection may send at once (0: 1000)", num(func(c *serveConfig) *int { return &c.Limits.FrameBurst })},
	{gLimits, "limits.byte_rate", "byte-rate", "inbound bytes per second per connection (0: 1 MiB; negative: none); past it the connection is closed with 4429", float(func(c *serveConfig) *float64 { return &c.Limits.ByteRate })},
	{gLimits, "limits.byte_burst", "byte-burst", "inbound bytes a connection may send at once (0: 4 MiB)", num(func(c *serveConfig) *int { return &c.Limits.ByteBurst })},
	{gLimits, "limits.max_denials", "max-denials", "refused requests before a connection is closed with 4403 (0: 100; negative: never)", num(func(c *serveConfig) *int { return &c.Limits.MaxDenials })},

	{gPG, "postgres.url", "pg-url", "Postgres connection string: bridge LISTEN/NOTIFY and the outbox onto topics (off when empty)", str(func(c *serveConfig) *string { return &c.Postgres.URL })},
	{gPG, "postgres.notify", "pg-notify", "channels to LISTEN on, comma separated (default table_changes unless --pg-outbox)", list(func(c *serveConfig) *[]string { return &c.Postgres.Notify })},
	{gPG, "postgres.outbox", "pg-outbox", "consume the transactional outbox table (every change, in order per topic)", boolean(func(c *serveConfig) *bool { return &c.Postgres.Outbox })},
	{gPG, "postgres.outbox_table", "pg-outbox-table", "name of the outbox table (default fabric_outbox)", str(func(c *serveConfig) *string { return &c.Postgres.OutboxTable })},
	{gPG, "postgres.outbox_partitions", "pg-outbox-partitions", "partitions of a new outbox table (default 8)", num(func(c *serveConfig) *int { return &c.Postgres.OutboxPartitions })},
	{gPG, "postgres.no_migrate", "pg-no-migrate", "do not create the outbox table (the operator does)", boolean(func(c *serveConfig) *bool { return &c.Postgres.NoMigrate })},
	{gPG, "postgres.persist", "pg-persist", "keep every bridged message in its topic's history", boolean(func(c *serveConfig) *bool { return &c.Postgres.Persist })},
	{gPG, "postgres.lease_ttl", "pg-lease-ttl", "lease making one instance the listener of a channel (default 3s)", dur(func(c *serveConfig) *time.Duration { return &c.Postgres.LeaseTTL })},

	{gEmbed, "embed.data", "data", "data dir: JetStream store and instance lock (one instance per dir)", str(func(c *serveConfig) *string { return &c.Embed.DataDir })},
	{gEmbed, "embed.name", "name", "server name, unique in a cluster (default: generated once, kept in the data dir)", str(func(c *serveConfig) *string { return &c.Embed.Name })},
	{gEmbed, "embed.listen", "nats-listen", "open a NATS client port on this address (none by default)", str(func(c *serveConfig) *string { return &c.Embed.Listen })},
	{gEmbed, "embed.monitor", "nats-monitor", "open the embedded NATS server's HTTP monitoring (/varz, /jsz, ...) on this address (none by default)", str(func(c *serveConfig) *string { return &c.Embed.Monitor })},
	{gEmbed, "embed.cluster_name", "cluster-name", "NATS cluster name shared by the instances", str(func(c *serveConfig) *string { return &c.Embed.ClusterName })},
	{gEmbed, "embed.cluster_listen", "cluster-listen", "address peers route to, e.g. 0.0.0.0:6222", str(func(c *serveConfig) *string { return &c.Embed.ClusterListen })},
	{gEmbed, "embed.routes", "routes", "peers' cluster URLs, comma separated: nats://host:6222,...", list(func(c *serveConfig) *[]string { return &c.Embed.Routes })},
	{gEmbed, "embed.leaf_remotes", "leaf-remote", "attach as a leaf node to these NATS leafnode URLs, comma separated", list(func(c *serveConfig) *[]string { return &c.Embed.LeafRemotes })},
	{gEmbed, "embed.leaf_creds", "leaf-creds", "credentials file for the leaf connection", str(func(c *serveConfig) *string { return &c.Embed.LeafCreds })},
	{gEmbed, "embed.leaf_listen", "leaf-listen", "accept leaf nodes on this address (act as a hub)", str(func(c *serveConfig) *string { return &c.Embed.LeafListen })},
	{gEmbed, "embed.js_domain", "js-domain", "JetStream domain (default with --leaf-remote: the server name)", str(func(c *serveConfig) *string { return &c.Embed.JSDomain })},
	{gEmbed, "embed.gateway_listen", "gateway-listen", "accept gateways from the other clusters of a supercluster on this address, e.g. 0.0.0.0:7222 (--cluster-name names this cluster; every instance needs it)", str(func(c *serveConfig) *string { return &c.Embed.GatewayListen })},
	{gEmbed, "embed.gateways", "gateways", "the supercluster's other clusters, comma separated NAME=URL (a name may repeat): west=nats://west-0:7222,west=nats://west-1:7222", list(func(c *serveConfig) *[]string { return &c.Embed.Gateways })},
	{gEmbed, "embed.sync_always", "sync-always", "fsync JetStream writes before acknowledging them", boolean(func(c *serveConfig) *bool { return &c.Embed.SyncAlways })},

	{gNATS, "nats.url", "nats-url", "connect to this NATS deployment instead of embedding a server", str(func(c *serveConfig) *string { return &c.NATS.URL })},
	{gNATS, "nats.creds", "nats-creds", "credentials (.creds) file", str(func(c *serveConfig) *string { return &c.NATS.Creds })},
	{gNATS, "nats.nkey", "nats-nkey", "nkey seed file", str(func(c *serveConfig) *string { return &c.NATS.Nkey })},
	{gNATS, "nats.token", "nats-token", "authentication token", str(func(c *serveConfig) *string { return &c.NATS.Token })},
	{gNATS, "nats.tls_cert", "nats-tls-cert", "client certificate (PEM)", str(func(c *serveConfig) *string { return &c.NATS.TLSCert })},
	{gNATS, "nats.tls_key", "nats-tls-key", "client key (PEM)", str(func(c *serveConfig) *string { return &c.NATS.TLSKey })},
	{gNATS, "nats.tls_ca", "nats-tls-ca", "CA bundle to verify the server (PEM)", str(func(c *serveConfig) *string { return &c.NATS.TLSCA })},
	{gNATS, "nats.subject_prefix", "subject-prefix", "first token of every Fabric subject, stream and bucket (isolates tenants)", str(func(c *serveConfig) *string { return &c.NATS.SubjectPrefix })},
	{gNATS, "nats.kv_replicas", "kv-replicas", "replicas of the presence, rate-limit and lease state (0: min(3, cluster size), the size counted from --routes)", num(func(c *serveConfig) *int { return &c.NATS.KVReplicas })},

	{gRedis, "redis.url", "redis-url", "redis://[user:password@]host:port[/db] (rediss:// for TLS); more cluster nodes or Sentinels as ?addr=host:port, Sentinel with ?master_set=NAME", str(func(c *serveConfig) *string { return &c.Redis.URL })},
	{gRedis, "redis.prefix", "redis-prefix", "first part of every Redis key and channel (isolates tenants sharing a Redis)", str(func(c *serveConfig) *string { return &c.Redis.Prefix })},
	{gRedis, "redis.partitions", "redis-partitions", "hash tags keys and channels are spread over, one cluster slot each (every instance must use the same)", num(func(c *serveConfig) *int { return &c.Redis.Partitions })},
	{gRedis, "redis.sharded", "redis-sharded", "sharded pub/sub: auto (on Redis Cluster), on (Redis 7+) or off", str(func(c *serveConfig) *string { return &c.Redis.Sharded })},
}

// classKey is one key of an admission.classes entry in the config file.
type classKey struct {
	key   string
	usage string
	bind  func(c *admission.ClassConfig) value
}

// classKeys are the keys of an admission class.
var classKeys = []classKey{
	{"name", "the class: the class label of admission_accepted_total and admission_rejected_total (required)", func(c *admission.ClassConfig) value { return strValue{&c.Name} }},
	{"reject_on", "pressure reasons that refuse the class: MEMORY, PUBLISH_RATE, SUBSCRIBERS", func(c *admission.ClassConfig) value { return listValue{&c.RejectOn} }},
	{"cluster_top_publisher", "refuse client publishes to a topic published cluster-wide faster than this (messages/s; needs aggregator.enable)", func(c *admission.ClassConfig) value { return floatValue{&c.ClusterTopPublisher} }},
	{"rpc", "globs of RPC paths in the class (reports/*)", func(c *admission.ClassConfig) value { return listValue{&c.RPC} }},
	{"topics", "globs of topics whose client publishes are in the class", func(c *admission.ClassConfig) value { return listValue{&c.Topics} }},
}

// topicKey is one key of a topics entry in the config file.
type topicKey struct {
	key   string
	usage string
	bind  func(p *server.TopicPolicy) value
}

// topicKeys are the keys of a topics entry.
var topicKeys = []topicKey{
	{"pattern", "glob the policy applies to: * stands for any run of characters (required)", func(p *server.TopicPolicy) value { return strValue{&p.Pattern} }},
	{"persistent", "keep every message in the history: messages carry seq, clients resume from it", func(p *server.TopicPolicy) value { return boolValue{&p.Persistent} }},
	{"replay_max_per_topic", "messages kept per matching topic (default replay.max_per_topic)", func(p *server.TopicPolicy) value { return intValue{&p.ReplayMaxPerTopic} }},
	{"replay_max_age", "drop the matching topics' messages older than this (default replay.max_age)", func(p *server.TopicPolicy) value { return durValue{&p.ReplayMaxAge} }},
	{"presence", "subscribers join the topic's presence (__presence:T lists them)", func(p *server.TopicPolicy) value { return boolValue{&p.Presence} }},
	{"client_publish", "clients may publish to the topic with the fabric/publish RPC", func(p *server.TopicPolicy) value { return boolValue{&p.ClientPublish} }},
	{"read", "with authentication on, who may subscribe, read history and see presence: token (the token's subscribe patterns; the default), public (anyone, anonymous included) or user (per-user topics: only the user whose id stands where the pattern has ${sub}, as in user:${sub})", func(p *server.TopicPolicy) value { return strValue{&p.Read} }},
}
