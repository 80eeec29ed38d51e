// Package redis is a Fabric backend on Redis (or any server speaking its
// protocol: Valkey, KeyDB, Dragonfly with Lua): pub/sub (Broker), history
// with sequences and epochs (History), presence entries with expiry
// (PresenceStore), rate limits (RateLimiter), cluster-wide counts and
// actions on users (Cluster) and leases (LeaseStore), through the rueidis
// client. It runs on one Redis server, on a Sentinel-managed one, and on
// Redis Cluster (sharded pub/sub). docs/redis.md is the operator's guide.
//
// Every key and channel the backend uses starts with the prefix and a
// partition hash tag: "<prefix>:{<p>}:…", p = fnv-1a-32(topic, user or key)
// mod Partitions. On Redis Cluster everything of one partition lives in one
// hash slot, so that one Lua script can update a topic's history and publish
// it (SPUBLISH) atomically, and one connection per partition carries its
// sharded subscriptions. Every multi-key operation is a Lua script on the
// keys of one partition: atomic, one round trip.
//
// The layout (P a partition, T a topic, exactly as given):
//
//	<prefix>:{P}:t:T         channel: T's messages (PUBLISH, or SPUBLISH on a cluster)
//	<prefix>:{P}:hm:T        hash: T's history epoch (e) and last sequence (s)
//	<prefix>:{P}:hs:T        stream: T's retained messages, ids "<seq>-0", fields t (ms) and d
//	<prefix>:{P}:pz, :ph     zset and hash: presence expiries and entries of the partition
//	<prefix>:{P}:pv, :pc     counter and channel: presence versions and changes
//	<prefix>:{P}:rc:…, :rb:… hash and string: rate-limit counters and bans
//	<prefix>:{P}:l:NAME      string: a lease's holder, with its ttl
//	<prefix>:{P}:sys:…, :u:U channels: cluster view requests, replies, users
package redis

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
	"github.com/redis/rueidis"
)

// Defaults of Options.
const (
	// DefaultPrefix is the first part of every key and channel.
	DefaultPrefix = "fabric"
	// DefaultPartitions is how many hash tags the keys are spread over.
	DefaultPartitions = 16
	// MaxPartitions is the most partitions a Backend accepts.
	MaxPartitions = 1024
	// DefaultMaxPerTopic is how many messages each topic's history keeps
	// (the seed's maxPerTopic).
	DefaultMaxPerTopic = 200
	// DefaultTimeout bounds one Redis call whose context has no deadline.
	DefaultTimeout = 5 * time.Second
	// DefaultBreakerThreshold is how many consecutive failures open the
	// default circuit breaker.
	DefaultBreakerThreshold = 5
	// DefaultBreakerReset is how long the default circuit breaker stays
	// open before it lets a probe through.
	DefaultBreakerReset = 2 * time.Second
	// DefaultEmptyTopicTTL is how long the epoch of a topic that has no
	// message yet is kept (see History.Epoch) when MaxAge is not set.
	DefaultEmptyTopicTTL = 24 * time.Hour
	// DefaultDedupeWindow is how long History.Append remembers a msgID.
	DefaultDedupeWindow = 2 * time.Minute
	// DefaultPresenceSweep is how often each instance removes expired
	// presence entries.
	DefaultPresenceSweep = time.Second
)

// ErrClosed is returned by operations on a closed Backend or Broker.
var ErrClosed = errors.New("redis: backend closed")

// Options configures New. URL (or ClientOption, or Client) is required; the
// rest has defaults.
type Options struct {
	// URL is the Redis address: redis://[user:password@]host:port[/db],
	// rediss:// for TLS, unix:///path. More nodes of a Redis Cluster go in
	// repeated addr parameters (redis://a:7000?addr=b:7001&addr=c:7002);
	// with master_set=NAME the addresses are Sentinels
	// (redis://s1:26379?addr=s2:26379&master_set=mymaster). Other
	// parameters are rueidis's (dial_timeout, write_timeout, protocol=2,
	// client_name, skip_verify).
	URL string
	// ClientOption configures the client fully instead of URL.
	ClientOption *rueidis.ClientOption
	// Client is a client to use instead of making one; the caller keeps
	// owning it (Close does not close it).
	Client rueidis.Client
	// Prefix starts every key and channel (default "fabric"); instances
	// that share topics must share it, and different prefixes isolate
	// tenants. It must not contain '{' or '}'.
	Prefix string
	// Partitions is how many hash tags keys and channels are spread over
	// (default 16, at most MaxPartitions). On Redis Cluster each
	// partition is one hash slot (so at most Partitions masters share the
	// load) and one pub/sub connection per instance. Every instance must
	// use the same count: another one puts topics under other keys (a new
	// epoch for each).
	Partitions int
	// Sharded selects sharded pub/sub (SPUBLISH, SSUBSCRIBE; Redis 7):
	// "auto" (default) uses it on Redis Cluster only, "on" everywhere,
	// "off" nowhere (plain PUBLISH, which a cluster broadcasts to every
	// node).
	Sharded string
	// MaxPerTopic is how many messages each topic's history keeps
	// (default 200).
	MaxPerTopic int
	// MaxAge drops history messages older than this (default 0: none). A
	// topic not appended to for MaxAge loses its history keys, and its
	// next message starts a new epoch.
	MaxAge time.Duration
	// DedupeWindow is how long an Append's msgID is remembered (default
	// 2m; one small key per msgID for that long).
	DedupeWindow time.Duration
	// EmptyTopicTTL is how long the epoch of a topic without messages
	// (created by Epoch, Last or Since) is kept (default MaxAge when set,
	// else 24h).
	EmptyTopicTTL time.Duration
	// Timeout bounds each Redis call whose context has no deadline
	// (default 5s).
	Timeout time.Duration
	// Breaker guards every Redis call (default: one named "redis" that
	// opens after 5 consecutive failures and probes again after 2s). While
	// it is open, calls fail at once with an error wrapping
	// breaker.ErrOpen and fabric.ErrBackendUnavailable.
	Breaker *breaker.Breaker
	// Shards, ShardBuffer and TopicBuffer tune the Brokers' delivery (see
	// BrokerOptions).
	Broker BrokerOptions
	// PresenceSweep is how often the presence store removes expired
	// entries (default 1s): an entry leaves at most this long after its
	// ttl.
	PresenceSweep time.Duration
	// Logger receives warnings; nil discards them.
	Logger *slog.Logger
}

// Backend is one connection to Redis and everything Fabric keeps there.
// Make it with New and stop it with Close.
type Backend struct {
	client  rueidis.Client
	owned   bool
	opts    Options
	log     *slog.Logger
	sharded bool
	brk     *breaker.Breaker
	ps      *pubsub

	epochBase string
	epochNext atomic.Uint64

	history *History
	leases  *Leases

	localMu  sync.Mutex
	local    map[string][]*subscription // this backend's broker subscriptions, by topic
	presOnce sync.Once
	presence *PresenceStore

	closed    atomic.Bool // calls fail with ErrClosed
	done      chan struct{}
	closeOnce sync.Once
	mu        sync.Mutex
	closing   bool // under mu: no more closers
	closers   []func()
}

// New connects to Redis (one PING, bounded by ctx) and returns a Backend.
func New(ctx context.Context, opts Options) (*Backend, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if strings.ContainsAny(opts.Prefix, "{}") {
		return nil, fmt.Errorf("redis: prefix %q: must not contain { or }", opts.Prefix)
	}
	if opts.Partitions <= 0 {
		opts.Partitions = DefaultPartitions
	}
	if opts.Partitions > MaxPartitions {
		return nil, fmt.Errorf("redis: %d partitions, at most %d", opts.Partitions, MaxPartitions)
	}
	if opts.MaxPerTopic <= 0 {
		opts.MaxPerTopic = DefaultMaxPerTopic
	}
	if opts.MaxAge < 0 {
		opts.MaxAge = 0
	}
	if opts.EmptyTopicTTL <= 0 {
		opts.EmptyTopicTTL = DefaultEmptyTopicTTL
		if opts.MaxAge > 0 {
			opts.EmptyTopicTTL = opts.MaxAge
		}
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.DedupeWindow <= 0 {
		opts.DedupeWindow = DefaultDedupeWindow
	}
	if opts.PresenceSweep <= 0 {
		opts.PresenceSweep = DefaultPresenceSweep
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	switch opts.Sharded {
	case "", "auto", "on", "off":
	default:
		return nil, fmt.Errorf("redis: sharded %q: want auto, on or off", opts.Sharded)
	}
	b := &Backend{opts: opts, log: opts.Logger, done: make(chan struct{}), local: map[string][]*subscription{}}
	var id [6]byte
	_, _ = rand.Read(id[:])
	b.epochBase = hex.EncodeToString(id[:])
	switch {
	case opts.Client != nil:
		b.client = opts.Client
	default:
		var co rueidis.ClientOption
		if opts.ClientOption != nil {
			co = *opts.ClientOption
		} else {
			if opts.URL == "" {
				return nil, errors.New("redis: no URL")
			}
			var err error
			if co, err = rueidis.ParseURL(opts.URL); err != nil {
				return nil, fmt.Errorf("redis: url %s: %w", RedactURL(opts.URL), err)
			}
		}
		if co.ClientName == "" {
			co.ClientName = "fabric"
		}
		// Client-side caching is of no use here (every read is a script),
		// and it would take a tracking slot on the server.
		co.DisableCache = true
		c, err := rueidis.NewClient(co)
		if err != nil {
			return nil, fmt.Errorf("redis: connect to %s: %w", describe(opts, co), unavailable(err))
		}
		b.client, b.owned = c, true
	}
	switch opts.Sharded {
	case "on":
		b.sharded = true
	case "off":
	default:
		b.sharded = b.client.Mode() == rueidis.ClientModeCluster
	}
	b.brk = opts.Breaker
	if b.brk == nil {
		var err error
		b.brk, err = breaker.New(breaker.Options{Name: "redis", FailureThreshold: DefaultBreakerThreshold,
			ResetTimeout: DefaultBreakerReset, IsFailure: isFailure})
		if err != nil {
			b.closeClient()
			return nil, fmt.Errorf("redis: breaker: %w", err)
		}
	}
	pctx, cancel := b.bound(ctx)
	err := b.client.Do(pctx, b.client.B().Ping().Build()).Error()
	cancel()
	if err != nil {
		b.closeClient()
		return nil, fmt.Errorf("redis: ping: %w", b.classify(ctx, err))
	}
	b.ps = newPubsub(b)
	b.history = &History{b: b}
	b.leases = &Leases{b: b}
	return b, nil
}

// describe names the server a client connects to, without credentials.
func describe(o Options, co rueidis.ClientOption) string {
	if o.URL != "" {
		return RedactURL(o.URL)
	}
	return strings.Join(co.InitAddress, ",")
}

// RedactURL returns u with its password replaced by "xxxxx".
func RedactURL(u string) string {
	i := strings.Index(u, "://")
	if i < 0 {
		return u
	}
	rest := u[i+3:]
	end := strings.IndexAny(rest, "/?")
	if end < 0 {
		end = len(rest)
	}
	at := strings.LastIndexByte(rest[:end], '@')
	if at < 0 {
		return u
	}
	cred := rest[:at]
	if c := strings.IndexByte(cred, ':'); c >= 0 {
		cred = cred[:c] + ":xxxxx"
	} else if cred != "" {
		cred = "xxxxx" // a bare password (redis://:pw@ parses as user "")
	}
	return u[:i+3] + cred + rest[at:]
}

// Client returns the rueidis client.
func (b *Backend) Client() rueidis.Client { return b.client }

// Options returns the options in effect, defaults filled in.
func (b *Backend) Options() Options { return b.opts }

// Sharded reports whether the backend uses sharded pub/sub.
func (b *Backend) Sharded() bool { return b.sharded }

// Breaker returns the circuit breaker around the backend's Redis calls.
func (b *Backend) Breaker() *breaker.Breaker { return b.brk }

// Close stops every goroutine of the backend (Brokers, presence store,
// cluster views, limiters made from it) and closes the client if the
// backend made it. It is idempotent.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closing = true
		closers := b.closers
		b.closers = nil
		b.mu.Unlock()
		// Brokers and cluster views first, while calls still work (a
		// cluster view says goodbye).
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
		b.mu.Lock()
		pres := b.presence
		b.mu.Unlock()
		if pres != nil {
			_ = pres.Close()
		}
		b.closed.Store(true)
		close(b.done)
		b.ps.close()
		b.closeClient()
	})
	return nil
}

// onClose registers fn to run when the backend closes (last registered,
// first run); it reports false (and does not register) when the backend is
// already closed.
func (b *Backend) onClose(fn func()) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing {
		return false
	}
	b.closers = append(b.closers, fn)
	return true
}

func (b *Backend) closeClient() {
	if b.owned {
		b.client.Close()
	}
}

// Ping asks Redis for a PONG (the server's readiness check).
func (b *Backend) Ping(ctx context.Context) error {
	return b.callIdempotent(ctx, "ping", func(ctx context.Context) error {
		return b.client.Do(ctx, b.client.B().Ping().Build()).Error()
	})
}

// Ready reports whether the backend works: Redis answers a PING and every
// pub/sub connection that has channels is up (after a break, messages are
// lost until it is back).
func (b *Backend) Ready(ctx context.Context) error {
	if err := b.Ping(ctx); err != nil {
		return err
	}
	if !b.ps.connectedAll() {
		return fmt.Errorf("redis: pub/sub connection down (reconnecting): %w", fabric.ErrBackendUnavailable)
	}
	return nil
}

// localWait bounds how long an Append waits for this instance's own
// subscribers to be handed its message.
const localWait = time.Second

func (b *Backend) addLocal(s *subscription) {
	b.localMu.Lock()
	b.local[s.topic] = append(b.local[s.topic], s)
	b.localMu.Unlock()
}

func (b *Backend) removeLocal(s *subscription) {
	b.localMu.Lock()
	defer b.localMu.Unlock()
	subs := b.local[s.topic]
	for i, x := range subs {
		if x == s {
			subs = append(subs[:i:i], subs[i+1:]...)
			break
		}
	}
	if len(subs) == 0 {
		delete(b.local, s.topic)
	} else {
		b.local[s.topic] = subs
	}
}

// awaitLocal waits until every subscription of topic made through this
// backend's Brokers has been handed seq (read your writes on the appending
// instance: its message travels back on the pub/sub connection, the
// script's reply on another), at most localWait or until ctx ends, and not
// at all while a pub/sub connection is down.
func (b *Backend) awaitLocal(ctx context.Context, topic string, seq uint64) {
	b.localMu.Lock()
	subs := b.local[topic]
	b.localMu.Unlock()
	if len(subs) == 0 || !b.ps.connectedAll() {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, localWait)
	defer cancel()
	for _, s := range subs {
		s.await(seq, wctx.Done()) // a stopped subscription returns at once
	}
}

// --- keys ---

// partition returns the partition of s: fnv-1a-32 of its bytes mod the
// partition count, the same on every instance with the same count.
func (b *Backend) partition(s string) int {
	x := uint32(2166136261)
	for i := 0; i < len(s); i++ {
		x ^= uint32(s[i])
		x *= 16777619
	}
	return int(x % uint32(b.opts.Partitions))
}

// key returns "<prefix>:{p}:<kind>:<name>" (":<name>" left out when name
// is empty).
func (b *Backend) key(p int, kind, name string) string {
	var sb strings.Builder
	sb.Grow(len(b.opts.Prefix) + len(kind) + len(name) + 10)
	sb.WriteString(b.opts.Prefix)
	sb.WriteString(":{")
	sb.WriteString(strconv.Itoa(p))
	sb.WriteString("}:")
	sb.WriteString(kind)
	if name != "" {
		sb.WriteByte(':')
		sb.WriteString(name)
	}
	return sb.String()
}

// topicChannel returns the channel of topic's messages.
func (b *Backend) topicChannel(topic string) string { return b.key(b.partition(topic), "t", topic) }

// TopicChannel returns the pub/sub channel that carries topic's messages
// (for operators: each message is a one-byte header, see Broker, then the
// envelope).
func (b *Backend) TopicChannel(topic string) string { return b.topicChannel(topic) }

// newEpoch returns a fresh epoch candidate: random per process, then a
// counter.
func (b *Backend) newEpoch() string {
	return b.epochBase + strconv.FormatUint(b.epochNext.Add(1), 36)
}

// --- calls ---

// bound gives ctx the backend's Timeout when it has no deadline.
func (b *Backend) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, b.opts.Timeout)
}

// call runs fn under the circuit breaker with a bounded context; its error
// is classified (see classify) and wrapped with what. fn runs once: use it
// for what must not run twice (a publish, an append without a message id,
// a rate-limit decision).
func (b *Backend) call(ctx context.Context, what string, fn func(ctx context.Context) error) error {
	return b.do(ctx, what, false, fn)
}

// callIdempotent is call for fn that may run more than once: after a
// connection error it runs again at once, up to idempotentRetries times.
// Right after Redis restarts, each pooled connection of the client fails
// its next command (it finds its old connection closed, sends nothing) and
// is replaced; the retries go out on fresh ones.
func (b *Backend) callIdempotent(ctx context.Context, what string, fn func(ctx context.Context) error) error {
	return b.do(ctx, what, true, fn)
}

// idempotentRetries covers rueidis's pipelined connections to one server
// (4 by default).
const idempotentRetries = 4

func (b *Backend) do(ctx context.Context, what string, idempotent bool, fn func(ctx context.Context) error) error {
	if b.closed.Load() {
		return fmt.Errorf("redis: %s: %w", what, ErrClosed)
	}
	done, err := b.brk.Allow()
	if err != nil {
		return fmt.Errorf("redis: %s: %w", what, openError{err})
	}
	cctx, cancel := b.bound(ctx)
	err = fn(cctx)
	for i := 0; i < idempotentRetries && err != nil && idempotent && connError(err) && cctx.Err() == nil; i++ {
		err = fn(cctx)
	}
	cancel()
	if err != nil {
		err = b.classify(ctx, err)
	}
	done(err)
	if err != nil {
		return fmt.Errorf("redis: %s: %w", what, err)
	}
	return nil
}

// connError reports an error of the connection (not one Redis answered,
// not the caller's deadline).
func connError(err error) bool {
	if _, ok := rueidis.IsRedisErr(err); ok {
		return false
	}
	return !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && !errors.Is(err, rueidis.ErrClosing)
}

// openError is a call refused by the open circuit breaker: it wraps
// breaker.ErrOpen and fabric.ErrBackendUnavailable.
type openError struct{ err error }

// Error implements error.
func (e openError) Error() string {
	return e.err.Error() + " (Redis failed repeatedly: calls fail at once until a probe succeeds)"
}

// Unwrap returns breaker.ErrOpen's error and fabric.ErrBackendUnavailable.
func (e openError) Unwrap() []error { return []error{e.err, fabric.ErrBackendUnavailable} }

// classify wraps err with fabric.ErrBackendUnavailable when it means "try
// again later": no connection, a timeout, a server loading, failing over
// or out of memory. A refusal (a script error, a wrong type) is returned
// as is.
func (b *Backend) classify(ctx context.Context, err error) error {
	if err == nil || errors.Is(err, fabric.ErrBackendUnavailable) {
		return err
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return err // the caller gave up
	}
	if re, ok := rueidis.IsRedisErr(err); ok {
		msg := re.Error()
		for _, p := range []string{"LOADING", "BUSY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "READONLY", "NOREPLICAS", "OOM", "MOVED", "ASK"} {
			if strings.HasPrefix(msg, p) {
				return unavailable(err)
			}
		}
		return err
	}
	return unavailable(err)
}

// unavailable marks err as a backend outage.
func unavailable(err error) error {
	if err == nil || errors.Is(err, fabric.ErrBackendUnavailable) {
		return err
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: %w (redis did not answer in time)", fabric.ErrBackendUnavailable, err)
	}
	return fmt.Errorf("%w: %w", fabric.ErrBackendUnavailable, err)
}

// isFailure is the default breaker's IsFailure: outages count, refusals
// and cancellations do not.
func isFailure(err error) bool {
	return err != nil && errors.Is(err, fabric.ErrBackendUnavailable) && !errors.Is(err, context.Canceled)
}

// publishCmd builds the publish of payload on channel: SPUBLISH when
// sharded.
func (b *Backend) publishCmd(channel, payload string) rueidis.Completed {
	if b.sharded {
		return b.client.B().Spublish().Channel(channel).Message(payload).Build()
	}
	return b.client.B().Publish().Channel(channel).Message(payload).Build()
}

// publish sends payload on channel, under the breaker.
func (b *Backend) publish(ctx context.Context, what, channel, payload string) error {
	return b.call(ctx, what, func(ctx context.Context) error {
		return b.client.Do(ctx, b.publishCmd(channel, payload)).Error()
	})
}

// shardedFlag is the script argument telling a script to SPUBLISH.
func (b *Backend) shardedFlag() string {
	if b.sharded {
		return "1"
	}
	return "0"
}

// clip shortens s for error messages.
func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}

// ms returns d in whole milliseconds, at least 1.
func ms(d time.Duration) int64 { return max(int64((d+time.Millisecond-1)/time.Millisecond), 1) }

// script is a Lua script run with EVALSHA, falling back to EVAL when the
// server does not have it cached.
type script struct {
	lua *rueidis.Lua
	src string
	sha string
}

func newScript(src string) *script {
	l := rueidis.NewLuaScript(src)
	return &script{lua: l, src: src, sha: shaOf(src)}
}

// run executes the script once.
func (s *script) run(ctx context.Context, c rueidis.Client, keys, args []string) rueidis.RedisResult {
	return s.lua.Exec(ctx, c, keys, args)
}

// runMulti executes the script once per exec in one pipeline (commands of
// one slot keep their order), retrying with EVAL those the server did not
// have cached.
func (s *script) runMulti(ctx context.Context, c rueidis.Client, execs []rueidis.LuaExec) []rueidis.RedisResult {
	cmds := make(rueidis.Commands, len(execs))
	for i, e := range execs {
		cmds[i] = c.B().Evalsha().Sha1(s.sha).Numkeys(int64(len(e.Keys))).Key(e.Keys...).Arg(e.Args...).Build()
	}
	res := c.DoMulti(ctx, cmds...)
	var again []int
	for i, r := range res {
		if re, ok := rueidis.IsRedisErr(r.Error()); ok && re.IsNoScript() {
			again = append(again, i)
		}
	}
	if len(again) > 0 {
		cmds = cmds[:0]
		for _, i := range again {
			e := execs[i]
			cmds = append(cmds, c.B().Eval().Script(s.src).Numkeys(int64(len(e.Keys))).Key(e.Keys...).Arg(e.Args...).Build())
		}
		for j, r := range c.DoMulti(ctx, cmds...) {
			res[again[j]] = r
		}
	}
	return res
}

// logFailure logs a failed background operation: at debug level while the
// circuit breaker is open (the outage was already reported), warn
// otherwise.
func (b *Backend) logFailure(msg string, err error, args ...any) {
	if errors.Is(err, breaker.ErrOpen) || errors.Is(err, ErrClosed) {
		b.log.Debug(msg, append(args, "err", err)...)
		return
	}
	b.log.Warn(msg, append(args, "err", err)...)
}
