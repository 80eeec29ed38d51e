package memory

import (
	"context"
	"fmt"
	"hash/fnv"
	"hash/maphash"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Rate-limit defaults, the seed's (svelte-adapter-uws-extensions
// createRateLimit) and jetstream's: 30 points per 10 seconds.
const (
	DefaultRatePoints   = 30
	DefaultRateInterval = 10 * time.Second
)

// RateLimitOptions configures Backend.RateLimiter. The zero value has the
// defaults.
type RateLimitOptions struct {
	// Name tells limiters apart (default "default"): limiters of one
	// Backend with the same Name share their counts and bans, as instances
	// of a cluster do. They should share the other options too.
	Name string
	// Points is the number of tokens per interval (default 30).
	Points int
	// Interval is the refill period (default 10s): a key's bucket holds
	// Points tokens at the start of each interval and is refilled to
	// Points at the next. Each key's intervals are shifted by a hash of the
	// key, so that keys do not all refill at once.
	Interval time.Duration
	// BlockDuration, when positive, bans a key for that long once a call
	// is refused because the key's tokens are exhausted.
	BlockDuration time.Duration
}

// RateLimiter is fabric.RateLimiter on a Backend: a fixed window per key,
// exact (no slack: at most Points tokens are admitted per key and
// interval), with the windows, bans and resets of jetstream.RateLimiter.
// Keys idle for a whole interval are forgotten by the backend's sweep.
type RateLimiter struct {
	st   *rlState
	opts RateLimitOptions
}

// rlState is what limiters of one name share.
type rlState struct {
	seed   maphash.Seed
	shards [rlShards]rlShard
}

const rlShards = 16

type rlShard struct {
	mu   sync.Mutex
	keys map[string]rlKey
	bans map[string]int64 // key → ban end, unix ns
}

type rlKey struct {
	window   int64 // the interval number used counts
	used     int   // tokens taken in window
	last     int64 // unix ns of the last call
	interval int64 // of the limiter that made the last call, for the sweep
}

// RateLimiter returns a limiter; limiters with the same Name share state.
func (b *Backend) RateLimiter(opts RateLimitOptions) *RateLimiter {
	if opts.Name == "" {
		opts.Name = "default"
	}
	if opts.Points <= 0 {
		opts.Points = DefaultRatePoints
	}
	if opts.Interval <= 0 {
		opts.Interval = DefaultRateInterval
	}
	b.limMu.Lock()
	defer b.limMu.Unlock()
	st := b.limiters[opts.Name]
	if st == nil {
		st = &rlState{seed: maphash.MakeSeed()}
		for i := range st.shards {
			st.shards[i].keys = map[string]rlKey{}
			st.shards[i].bans = map[string]int64{}
		}
		b.limiters[opts.Name] = st
	}
	return &RateLimiter{st: st, opts: opts}
}

// Points returns the tokens per interval.
func (l *RateLimiter) Points() int { return l.opts.Points }

// Interval returns the refill period.
func (l *RateLimiter) Interval() time.Duration { return l.opts.Interval }

func (st *rlState) shard(key string) *rlShard {
	return &st.shards[maphash.String(st.seed, key)%rlShards]
}

// window returns the interval number now (unix ns) falls in for key, and
// when it ends: jetstream.RateLimiter's computation, so that the two agree.
func (l *RateLimiter) window(key string, now int64) (w, end int64) {
	h := fnv.New64a()
	_, _ = h.Write([]byte(key))
	iv := int64(l.opts.Interval)
	offset := int64(h.Sum64() % uint64(iv))
	w = (now - offset) / iv
	return w, (w+1)*iv + offset
}

// Consume implements fabric.RateLimiter: cost (at least 1) tokens from
// key's bucket, refused when fewer are left or key is banned. It never
// fails (err is always nil).
func (l *RateLimiter) Consume(_ context.Context, key string, cost int) (allowed bool, remaining int, resetAfter time.Duration, err error) {
	cost = max(cost, 1)
	now := time.Now().UnixNano()
	s := l.st.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if until, ok := s.bans[key]; ok {
		if until > now {
			return false, 0, time.Duration(until - now), nil
		}
		delete(s.bans, key)
	}
	w, end := l.window(key, now)
	points := l.opts.Points
	k := s.keys[key]
	if k.window != w || k.interval == 0 {
		k.window, k.used = w, 0
	}
	k.last, k.interval = now, int64(l.opts.Interval)
	if cost <= points-k.used {
		k.used += cost
		s.keys[key] = k
		return true, points - k.used, time.Duration(end - now), nil
	}
	s.keys[key] = k
	if cost <= points && l.opts.BlockDuration > 0 { // exhausted, not merely too costly
		s.bans[key] = now + int64(l.opts.BlockDuration)
		return false, 0, l.opts.BlockDuration, nil
	}
	return false, points - k.used, time.Duration(end - now), nil
}

// Reset implements fabric.RateLimiter: key's consumption and ban are
// forgotten for every limiter of the name.
func (l *RateLimiter) Reset(_ context.Context, key string) error {
	s := l.st.shard(key)
	s.mu.Lock()
	delete(s.keys, key)
	delete(s.bans, key)
	s.mu.Unlock()
	return nil
}

// Ban implements fabric.RateLimiter: key is refused for d (d ≤ 0 unbans).
func (l *RateLimiter) Ban(ctx context.Context, key string, d time.Duration) error {
	if d <= 0 {
		return l.Unban(ctx, key)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory: rate limit ban %q: %w", clip(key), err)
	}
	s := l.st.shard(key)
	s.mu.Lock()
	s.bans[key] = time.Now().Add(d).UnixNano()
	s.mu.Unlock()
	return nil
}

// Unban implements fabric.RateLimiter.
func (l *RateLimiter) Unban(_ context.Context, key string) error {
	s := l.st.shard(key)
	s.mu.Lock()
	delete(s.bans, key)
	s.mu.Unlock()
	return nil
}

// Keys returns the number of keys the limiter's name currently tracks
// (counted or banned).
func (l *RateLimiter) Keys() int {
	n := 0
	for i := range l.st.shards {
		s := &l.st.shards[i]
		s.mu.Lock()
		n += len(s.keys)
		for k := range s.bans {
			if _, ok := s.keys[k]; !ok {
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

// sweepLimiters forgets keys idle for a whole interval (their counts are
// over) and bans that have ended.
func (b *Backend) sweepLimiters() {
	b.limMu.Lock()
	states := make([]*rlState, 0, len(b.limiters))
	for _, st := range b.limiters {
		states = append(states, st)
	}
	b.limMu.Unlock()
	now := time.Now().UnixNano()
	for _, st := range states {
		for i := range st.shards {
			s := &st.shards[i]
			s.mu.Lock()
			for key, k := range s.keys {
				if now-k.last > k.interval {
					delete(s.keys, key)
				}
			}
			for key, until := range s.bans {
				if until <= now {
					delete(s.bans, key)
				}
			}
			s.mu.Unlock()
		}
	}
}

var _ fabric.RateLimiter = (*RateLimiter)(nil)
