package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
)

// extConfig is what `fabric serve` can be told about the cluster-wide
// extensions (presence and rate limits on JetStream).
type extConfig struct {
	Presence          string
	PresenceHeartbeat time.Duration
	PresenceExpire    time.Duration
	RPCRateLimit      string
	RateLimitBy       string
	RateLimitBlock    time.Duration
	KVReplicas        int

	Replay            string
	ReplayMaxPerTopic int
	ReplayMaxAge      time.Duration
	ReplayReplicas    int
}

func extFlags(fs *flagSet, c *extConfig) {
	fs.section("Replay (JetStream history)")
	fs.str(&c.Replay, "replay", "", "persistent topics, comma-separated globs such as chat:*; their messages carry seq and clients resume from it")
	fs.integer(&c.ReplayMaxPerTopic, "replay-max-per-topic", fjs.DefaultMaxPerTopic, "messages kept per persistent topic")
	fs.duration(&c.ReplayMaxAge, "replay-max-age", 0, "drop history older than this, such as 24h (0: keep until pushed out by newer messages)")
	fs.integer(&c.ReplayReplicas, "replay-replicas", 1, "replicas of the history stream (3 in a cluster of three or more)")
	fs.section("Presence and rate limits (JetStream)")
	fs.str(&c.Presence, "presence", "", "topics with presence, comma-separated globs such as room:*; subscribers join, __presence:T lists them")
	fs.duration(&c.PresenceHeartbeat, "presence-heartbeat", fabric.DefaultPresenceHeartbeat, "how often presence entries are refreshed and heartbeat events sent")
	fs.duration(&c.PresenceExpire, "presence-expire", fabric.DefaultPresenceExpiry, "a dead instance's users leave after at most this long (whole seconds)")
	fs.str(&c.RPCRateLimit, "rpc-rate-limit", "", "limit RPC calls per key across the cluster: POINTS/INTERVAL such as 30/10s (off when empty)")
	fs.str(&c.RateLimitBy, "rate-limit-by", "user", "key of --rpc-rate-limit: ip, connection or user (anonymous users: their connection)")
	fs.duration(&c.RateLimitBlock, "rate-limit-block", 0, "ban a key this long once it has used up --rpc-rate-limit (0: no ban)")
	fs.integer(&c.KVReplicas, "kv-replicas", 1, "replicas of the presence and rate-limit state (3 in a cluster of three or more)")
}

// extensions are the running extensions of a server.
type extensions struct {
	presenceStore *fjs.PresenceStore
	presence      *fabric.Presence
	limiter       *fjs.RateLimiter
}

// parseRate reads POINTS/INTERVAL: "30/10s", "100/1m", or "30/10000" with
// the interval in milliseconds (the seed's unit).
func parseRate(s string) (int, time.Duration, error) {
	p, iv, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return 0, 0, fmt.Errorf("rate %q: want POINTS/INTERVAL, e.g. 30/10s", s)
	}
	points, err := strconv.Atoi(strings.TrimSpace(p))
	if err != nil || points <= 0 {
		return 0, 0, fmt.Errorf("rate %q: points must be a positive integer", s)
	}
	iv = strings.TrimSpace(iv)
	d, err := time.ParseDuration(iv)
	if err != nil {
		ms, merr := strconv.Atoi(iv)
		if merr != nil {
			return 0, 0, fmt.Errorf("rate %q: interval must be a duration such as 10s", s)
		}
		d = time.Duration(ms) * time.Millisecond
	}
	if d <= 0 {
		return 0, 0, fmt.Errorf("rate %q: interval must be positive", s)
	}
	return points, d, nil
}

// startHistory opens the history stream; it always runs, so that Persist()
// and POST /api/publish with "persist" work even without --replay patterns.
func (s *server) startHistory(ctx context.Context) (fabric.History, error) {
	c := s.cfg.Ext
	if c.ReplayMaxPerTopic <= 0 {
		return nil, fmt.Errorf("--replay-max-per-topic %d: must be positive", c.ReplayMaxPerTopic)
	}
	if c.ReplayMaxAge < 0 {
		return nil, fmt.Errorf("--replay-max-age %s: must not be negative", c.ReplayMaxAge)
	}
	patterns := splitList(c.Replay)
	h, err := fjs.NewHistory(ctx, s.js, fjs.HistoryOptions{
		Prefix:      s.cfg.SubjectPrefix,
		Eager:       len(patterns) > 0,
		MaxPerTopic: c.ReplayMaxPerTopic,
		MaxAge:      c.ReplayMaxAge,
		Replicas:    c.ReplayReplicas,
	})
	if err != nil {
		return nil, err
	}
	if len(patterns) > 0 {
		s.log.Info("replay on", "topics", patterns, "max_per_topic", c.ReplayMaxPerTopic, "max_age", c.ReplayMaxAge, "stream", h.Stream())
	}
	return h, nil
}

// startRateLimit starts the RPC rate limiter when --rpc-rate-limit is set
// and returns the node's BeforeExecute (nil without a limit).
func (s *server) startRateLimit(ctx context.Context) (func(context.Context, *fabric.Call) error, error) {
	c := s.cfg.Ext
	if c.RPCRateLimit == "" {
		return nil, nil
	}
	points, interval, err := parseRate(c.RPCRateLimit)
	if err != nil {
		return nil, fmt.Errorf("--rpc-rate-limit: %w", err)
	}
	keyBy, ok := fabric.KeyByName(c.RateLimitBy)
	if !ok {
		return nil, fmt.Errorf("--rate-limit-by %q: want ip, connection or user", c.RateLimitBy)
	}
	s.ext.limiter, err = fjs.NewRateLimiter(ctx, s.js, fjs.RateLimitOptions{
		Prefix:        s.cfg.SubjectPrefix,
		Name:          "rpc",
		Points:        points,
		Interval:      interval,
		BlockDuration: c.RateLimitBlock,
		Replicas:      c.KVReplicas,
		Logger:        s.log,
	})
	if err != nil {
		return nil, err
	}
	s.log.Info("RPC rate limit on", "points", points, "interval", interval, "by", c.RateLimitBy, "block", c.RateLimitBlock)
	return fabric.LimitRPC(s.ext.limiter, keyBy, 1, nil), nil
}

// startPresence turns presence on for the --presence topics; it must run
// before the edge accepts connections.
func (s *server) startPresence(ctx context.Context) error {
	c := s.cfg.Ext
	patterns := splitList(c.Presence)
	if len(patterns) == 0 {
		return nil
	}
	store, err := fjs.NewPresenceStore(ctx, s.js, fjs.PresenceStoreOptions{
		Prefix:    s.cfg.SubjectPrefix,
		Replicas:  c.KVReplicas,
		KeepAlive: c.PresenceHeartbeat,
		MarkerTTL: c.PresenceExpire,
		Logger:    s.log,
	})
	if err != nil {
		return err
	}
	s.ext.presenceStore = store
	p, err := fabric.NewPresence(ctx, s.node, store, fabric.PresenceOptions{
		HeartbeatInterval: c.PresenceHeartbeat,
		ExpireAfter:       c.PresenceExpire,
		Topics:            fabric.MatchTopics(patterns),
		Logger:            s.log,
	})
	if err != nil {
		return err
	}
	s.ext.presence = p
	s.log.Info("presence on", "topics", patterns, "bucket", store.Bucket())
	return nil
}

// closeExtensions stops the extensions; presence leaves for the
// connections still here, so their users leave everywhere at once.
func (s *server) closeExtensions() {
	if s.ext.presence != nil {
		s.ext.presence.Close()
	}
	if s.ext.presenceStore != nil {
		s.ext.presenceStore.Close()
	}
	if s.ext.limiter != nil {
		s.ext.limiter.Close()
	}
}
