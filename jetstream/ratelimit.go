package jetstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"hash/maphash"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Rate-limit defaults, the seed's (svelte-adapter-uws-extensions
// createRateLimit): 30 points per 10 seconds.
const (
	DefaultRatePoints   = 30
	DefaultRateInterval = 10 * time.Second
	// DefaultLeaseDivisor: a lease takes at most 1/4 of the tokens the
	// cluster has left in the interval (and at least what the call needs).
	DefaultLeaseDivisor = 4
)

// RateLimitOptions configures NewRateLimiter. The zero value has the
// defaults.
type RateLimitOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric").
	Prefix string
	// Name tells apart limiters that share a prefix (default "default");
	// instances enforce one limit together when prefix and name match.
	Name string
	// Points is the number of tokens per interval (default 30).
	Points int
	// Interval is the refill period (default 10s): a key's bucket holds
	// Points tokens at the start of each interval and is refilled to
	// Points at the next.
	Interval time.Duration
	// BlockDuration, when positive, bans a key for that long (everywhere)
	// once it has exhausted its tokens.
	BlockDuration time.Duration
	// Replicas of the counter stream and the ban bucket (default 1).
	Replicas int
	// LeaseDivisor bounds lease sizes: an instance leases at most 1/n of the
	// tokens left in the interval, cluster-wide (default 4). Larger means
	// more round trips and fewer tokens stranded on idle instances.
	LeaseDivisor int
	// FailOpen admits calls when JetStream cannot be reached (Consume then
	// returns the error with allowed=true); by default they are refused.
	FailOpen bool
	// Logger receives warnings; nil discards them.
	Logger *slog.Logger
}

// RateLimiter is a token bucket per key whose tokens are shared by every
// instance: at most Points are admitted per key and interval across the
// cluster.
//
// Each instance leases tokens from a JetStream counter per key and interval
// (subject "<prefix>.rlc.<name>.<key>.<interval number>", incremented with
// Nats-Incr) and serves calls from its lease without a round trip. The
// counter is the sum of every lease granted, so the tokens admitted never
// exceed Points; a lease request that overshoots is granted only what was
// left. Leases grow while a key is busy and shrink as the interval's tokens
// run out, down to one token; an instance that learns the interval is
// exhausted refuses locally until the next one. See docs/ratelimit.md.
type RateLimiter struct {
	js         jetstream.JetStream
	nc         *nats.Conn
	opts       RateLimitOptions
	log        *slog.Logger
	stream     jetstream.Stream
	bans       jetstream.KeyValue
	banPrefix  string
	subjPrefix string
	ctlSubject string
	seed       maphash.Seed

	keys    [rlShards]rlShard
	banned  [rlShards]banShard
	ctl     *nats.Subscription
	watcher jetstream.KeyWatcher
	cancel  context.CancelFunc

	leases atomic.Uint64

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

const rlShards = 64

type rlShard struct {
	mu   sync.Mutex
	keys map[string]*rlKey
}

// rlKey is one key's local state: the tokens leased for the current
// interval and what is known of the cluster-wide counter.
type rlKey struct {
	tok    string // KV/subject token of the key
	offset int64  // where the key's intervals start, ns past a multiple of Interval

	mu        sync.Mutex
	window    int64 // interval number the fields below belong to
	tokens    int   // leased and unused
	total     int64 // counter value after our last lease (tokens leased cluster-wide)
	exhausted bool  // the counter refused part of a lease: nothing left this interval
	lastLease int   // size of the last lease this interval (leases grow from it)
	inflight  chan struct{}
	demand    int    // tokens wanted by callers waiting for the lease in flight
	gen       uint64 // bumped by Reset: drops a lease that was in flight
	used      int64  // last interval touched, for the sweeper
}

type banShard struct {
	mu    sync.Mutex
	until map[string]int64 // key token → ban end, unix ns
}

// banValue is the JSON stored in the ban bucket.
type banValue struct {
	Key   string `json:"k"`
	Until int64  `json:"u"` // unix ms
}

// NewRateLimiter opens (or creates) the counter stream and the ban bucket
// and starts the ban watcher and the reset listener. Close stops them.
func NewRateLimiter(ctx context.Context, js jetstream.JetStream, opts RateLimitOptions) (*RateLimiter, error) {
	if js == nil {
		return nil, errors.New("jetstream: rate limiter needs a JetStream context")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Name == "" {
		opts.Name = "default"
	}
	if opts.Points <= 0 {
		opts.Points = DefaultRatePoints
	}
	if opts.Interval <= 0 {
		opts.Interval = DefaultRateInterval
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	if opts.LeaseDivisor <= 0 {
		opts.LeaseDivisor = DefaultLeaseDivisor
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	name := kvToken(opts.Name)
	l := &RateLimiter{
		js: js, nc: js.Conn(), opts: opts, log: opts.Logger, seed: maphash.MakeSeed(),
		subjPrefix: opts.Prefix + ".rlc." + name + ".",
		ctlSubject: opts.Prefix + ".rlctl." + name,
		stop:       make(chan struct{}),
	}
	for i := range l.keys {
		l.keys[i].keys = map[string]*rlKey{}
		l.banned[i].until = map[string]int64{}
	}
	base := nameToken(opts.Prefix) + "_rl_" + nameToken(opts.Name)
	scfg := jetstream.StreamConfig{
		Name:              base,
		Description:       "Fabric rate-limit counters: leased tokens per key and interval",
		Subjects:          []string{l.subjPrefix + ">"},
		Storage:           jetstream.MemoryStorage,
		Replicas:          opts.Replicas,
		MaxMsgsPerSubject: 1,
		MaxAge:            2*opts.Interval + time.Second,
		Discard:           jetstream.DiscardOld,
		AllowMsgCounter:   true,
	}
	var err error
	for {
		l.stream, err = js.CreateOrUpdateStream(ctx, scfg)
		if err == nil || ctx.Err() != nil {
			break
		}
		select { // JetStream may still be electing its leaders
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("jetstream: rate limiter: counter stream %s: %w", base, err)
	}
	l.bans, err = ensureTTLBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:         base + "_bans",
		Description:    "Fabric rate-limit bans",
		History:        1,
		Storage:        jetstream.MemoryStorage,
		Replicas:       opts.Replicas,
		LimitMarkerTTL: time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("jetstream: rate limiter: %w", err)
	}
	l.banPrefix = kvPutPrefix(js, base+"_bans")

	l.ctl, err = l.nc.Subscribe(l.ctlSubject, l.onControl)
	if err != nil {
		return nil, fmt.Errorf("jetstream: rate limiter: subscribe %s: %w", l.ctlSubject, err)
	}
	wctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	l.watcher, err = l.bans.WatchAll(wctx)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("jetstream: rate limiter: watch bans: %w", err)
	}
	ready := make(chan struct{})
	l.wg.Add(2)
	go l.watchBans(ready)
	go l.sweep()
	select {
	case <-ready:
	case <-ctx.Done():
		l.Close()
		return nil, fmt.Errorf("jetstream: rate limiter: loading bans: %w", ctx.Err())
	}
	return l, nil
}

// Points returns the tokens per interval.
func (l *RateLimiter) Points() int { return l.opts.Points }

// Leases returns how many lease round trips to JetStream this instance has
// made: the calls to Consume that were not served locally.
func (l *RateLimiter) Leases() uint64 { return l.leases.Load() }

// Interval returns the refill period.
func (l *RateLimiter) Interval() time.Duration { return l.opts.Interval }

// Consume takes cost tokens (at least 1) from key's bucket. It costs a
// JetStream round trip only when this instance's lease for the key is used
// up; a refusal for an exhausted interval or a ban costs none. remaining is
// a lower bound of the tokens left this interval cluster-wide; resetAfter is
// the time until the bucket refills, or until the ban ends. err reports a
// JetStream failure, allowed is then Options.FailOpen.
func (l *RateLimiter) Consume(ctx context.Context, key string, cost int) (allowed bool, remaining int, resetAfter time.Duration, err error) {
	if cost < 1 {
		cost = 1
	}
	k := l.key(key)
	now := time.Now()
	if until := l.banEnd(k.tok); until > now.UnixNano() {
		return false, 0, time.Duration(until - now.UnixNano()), nil
	}
	points := l.opts.Points
	for attempt := 0; ; attempt++ {
		now = time.Now()
		w, end := l.window(k, now)
		k.mu.Lock()
		if k.window != w {
			k.window, k.tokens, k.total, k.exhausted, k.lastLease = w, 0, 0, false, 0
		}
		k.used = w
		if k.tokens >= cost {
			k.tokens -= cost
			rem := k.remaining(points)
			k.mu.Unlock()
			return true, rem, end.Sub(now), nil
		}
		if k.exhausted || cost > points || attempt >= 16 {
			rem := k.remaining(points)
			exhausted := k.exhausted
			k.mu.Unlock()
			if exhausted && l.opts.BlockDuration > 0 {
				if until := l.banEnd(k.tok); until > now.UnixNano() {
					return false, 0, time.Duration(until - now.UnixNano()), nil // banned meanwhile
				}
				if err := l.Ban(ctx, key, l.opts.BlockDuration); err != nil {
					l.log.Warn("rate limit: automatic ban failed", "key", key, "err", err)
				}
				return false, 0, l.opts.BlockDuration, nil
			}
			return false, rem, end.Sub(now), nil
		}
		if ch := k.inflight; ch != nil {
			k.demand += cost
			k.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return l.failed(ctx.Err(), end.Sub(now))
			}
		}
		lease := l.leaseSize(cost-k.tokens+k.demand, k.lastLease, k.total)
		ch := make(chan struct{})
		k.inflight, k.demand, k.lastLease = ch, 0, lease
		gen := k.gen
		k.mu.Unlock()

		total, ierr := l.incr(ctx, k.tok, w, lease)

		k.mu.Lock()
		k.inflight = nil
		close(ch)
		if ierr == nil && k.window == w && k.gen == gen {
			granted := int64(points) - (total - int64(lease))
			granted = min(max(granted, 0), int64(lease))
			k.tokens += int(granted)
			k.total = max(k.total, total)
			if granted < int64(lease) {
				k.exhausted = true
			}
		}
		k.mu.Unlock()
		if ierr != nil {
			return l.failed(fmt.Errorf("jetstream: rate limit %q: lease: %w", key, ierr), end.Sub(now))
		}
	}
}

// remaining is the lower bound Consume reports. k.mu is held.
func (k *rlKey) remaining(points int) int {
	return max(int(int64(points)-k.total), 0) + k.tokens
}

func (l *RateLimiter) failed(err error, reset time.Duration) (bool, int, time.Duration, error) {
	return l.opts.FailOpen, 0, reset, err
}

// leaseSize is how many tokens to ask for. Leases start at what the callers
// need and double with each lease of the interval (so an instance that
// stops being asked strands at most about as much as it recently used),
// but never exceed a LeaseDivisor-th of what the cluster has left, unless
// the callers need more.
func (l *RateLimiter) leaseSize(need, last int, total int64) int {
	left := int64(l.opts.Points) - total
	ceiling := int(left / int64(l.opts.LeaseDivisor))
	n := min(2*last, ceiling)
	return min(max(n, need, 1), l.opts.Points)
}

// incr adds n to the counter of key token tok in interval w and returns the
// counter's new value.
func (l *RateLimiter) incr(ctx context.Context, tok string, w int64, n int) (int64, error) {
	l.leases.Add(1)
	m := nats.NewMsg(l.subjPrefix + tok + "." + strconv.FormatInt(w, 10))
	m.Header.Set("Nats-Incr", strconv.Itoa(n)) // JetStream counters (nats-server 2.12+)
	ack, err := l.js.PublishMsg(ctx, m)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(ack.Value, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("counter value %q: %w", ack.Value, err)
	}
	return v, nil
}

// window returns the interval number that now falls in for k, and its end.
// A key's intervals are shifted by a hash of the key, the same on every
// instance, so that keys do not all refill at the same instant.
func (l *RateLimiter) window(k *rlKey, now time.Time) (int64, time.Time) {
	iv := int64(l.opts.Interval)
	t := now.UnixNano() - k.offset
	w := t / iv
	return w, time.Unix(0, (w+1)*iv+k.offset)
}

func (l *RateLimiter) key(key string) *rlKey {
	s := &l.keys[maphash.String(l.seed, key)%rlShards]
	s.mu.Lock()
	k := s.keys[key]
	if k == nil {
		h := fnv.New64a()
		_, _ = h.Write([]byte(key))
		k = &rlKey{tok: kvToken(key), offset: int64(h.Sum64() % uint64(l.opts.Interval)), window: -1}
		s.keys[key] = k
	}
	s.mu.Unlock()
	return k
}

func (l *RateLimiter) banShard(tok string) *banShard {
	return &l.banned[maphash.String(l.seed, tok)%rlShards]
}

func (l *RateLimiter) banEnd(tok string) int64 {
	s := l.banShard(tok)
	s.mu.Lock()
	u := s.until[tok]
	s.mu.Unlock()
	return u
}

func (l *RateLimiter) setBan(tok string, until int64) {
	s := l.banShard(tok)
	s.mu.Lock()
	if until > 0 {
		s.until[tok] = until
	} else {
		delete(s.until, tok)
	}
	s.mu.Unlock()
}

// Ban refuses key on every instance for d: here at once, elsewhere as soon
// as their ban watchers see it (milliseconds).
func (l *RateLimiter) Ban(ctx context.Context, key string, d time.Duration) error {
	if d <= 0 {
		return l.Unban(ctx, key)
	}
	tok := kvToken(key)
	until := time.Now().Add(d)
	l.setBan(tok, until.UnixNano())
	b, _ := json.Marshal(banValue{Key: key, Until: until.UnixMilli()})
	m := nats.NewMsg(l.banPrefix + tok)
	m.Data = b
	if _, err := l.js.PublishMsg(ctx, m, jetstream.WithMsgTTL(ttlSeconds(d))); err != nil {
		return fmt.Errorf("jetstream: rate limit ban %q: %w", key, err)
	}
	return nil
}

// Unban lifts key's ban everywhere.
func (l *RateLimiter) Unban(ctx context.Context, key string) error {
	tok := kvToken(key)
	l.setBan(tok, 0)
	m := nats.NewMsg(l.banPrefix + tok)
	m.Header.Set("KV-Operation", "PURGE")
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	if _, err := l.js.PublishMsg(ctx, m, jetstream.WithMsgTTL(time.Second)); err != nil {
		return fmt.Errorf("jetstream: rate limit unban %q: %w", key, err)
	}
	return nil
}

// Reset forgets key's consumption and ban everywhere: its counters are
// purged and every instance drops its lease (as soon as it hears of the
// reset; until then it may still spend what it had leased).
func (l *RateLimiter) Reset(ctx context.Context, key string) error {
	tok := kvToken(key)
	if err := l.stream.Purge(ctx, jetstream.WithPurgeSubject(l.subjPrefix+tok+".>")); err != nil {
		return fmt.Errorf("jetstream: rate limit reset %q: purge counters: %w", key, err)
	}
	l.forget(key)
	if err := l.nc.Publish(l.ctlSubject, []byte(key)); err != nil {
		return fmt.Errorf("jetstream: rate limit reset %q: notify: %w", key, err)
	}
	return l.Unban(ctx, key)
}

// forget drops this instance's lease and knowledge of key's counter.
func (l *RateLimiter) forget(key string) {
	s := &l.keys[maphash.String(l.seed, key)%rlShards]
	s.mu.Lock()
	k := s.keys[key]
	s.mu.Unlock()
	if k != nil {
		k.mu.Lock()
		k.tokens, k.total, k.exhausted = 0, 0, false
		k.gen++
		k.mu.Unlock()
	}
	l.setBan(kvToken(key), 0)
}

// onControl handles a reset notice from any instance.
func (l *RateLimiter) onControl(m *nats.Msg) { l.forget(string(m.Data)) }

// watchBans keeps the local ban table in step with the ban bucket.
func (l *RateLimiter) watchBans(ready chan struct{}) {
	defer l.wg.Done()
	updates := l.watcher.Updates()
	for {
		select {
		case e, ok := <-updates:
			if !ok {
				return
			}
			if e == nil {
				if ready != nil {
					close(ready)
					ready = nil
				}
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				l.setBan(e.Key(), 0)
				continue
			}
			var v banValue
			if err := json.Unmarshal(e.Value(), &v); err != nil {
				l.log.Warn("rate limit: malformed ban", "key", e.Key(), "err", err)
				continue
			}
			l.setBan(e.Key(), v.Until*int64(time.Millisecond))
		case <-l.stop:
			drainUpdates(updates)
			return
		}
	}
}

// sweep forgets keys idle for a whole interval and bans that have ended.
func (l *RateLimiter) sweep() {
	defer l.wg.Done()
	t := time.NewTicker(max(l.opts.Interval, time.Second))
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case now := <-t.C:
		sweepKeys:
			for i := range l.keys {
				s := &l.keys[i]
				s.mu.Lock()
				for key, k := range s.keys {
					w, _ := l.window(k, now)
					k.mu.Lock()
					idle := k.used < w-1 && k.inflight == nil
					k.mu.Unlock()
					if idle {
						delete(s.keys, key)
					}
				}
				s.mu.Unlock()
				select {
				case <-l.stop:
					break sweepKeys
				default:
				}
			}
			ns := now.UnixNano()
			for i := range l.banned {
				b := &l.banned[i]
				b.mu.Lock()
				for tok, until := range b.until {
					if until <= ns {
						delete(b.until, tok)
					}
				}
				b.mu.Unlock()
			}
		}
	}
}

// Close stops the ban watcher, the reset listener and the sweeper.
func (l *RateLimiter) Close() error {
	l.closeOnce.Do(func() {
		close(l.stop)
		if l.ctl != nil {
			_ = l.ctl.Unsubscribe()
		}
		if l.watcher != nil {
			_ = l.watcher.Stop()
		}
		l.wg.Wait()
		if l.cancel != nil {
			l.cancel()
		}
	})
	return nil
}

var _ fabric.RateLimiter = (*RateLimiter)(nil)
