package redis

import (
	"context"
	"errors"
	"hash/fnv"
	"strconv"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Rate-limit defaults, the seed's (svelte-adapter-uws-extensions
// createRateLimit): 30 points per 10 seconds.
const (
	DefaultRatePoints   = 30
	DefaultRateInterval = 10 * time.Second
)

// RateLimitOptions configures Backend.RateLimiter. The zero value has the
// defaults.
type RateLimitOptions struct {
	// Name tells limiters apart (default "default"): limiters with the same
	// prefix and Name share their counts and bans, on every instance. They
	// should share the other options too.
	Name string
	// Points is the number of tokens per interval (default 30).
	Points int
	// Interval is the refill period (default 10s, whole milliseconds): a
	// key's bucket holds Points tokens at the start of each interval and is
	// refilled at the next. Each key's intervals are shifted by a hash of
	// the key (fnv-1a-64 mod Interval, as jetstream and memory do), so that
	// keys do not all refill at once.
	Interval time.Duration
	// BlockDuration, when positive, bans a key for that long once a call
	// is refused because its tokens ran out.
	BlockDuration time.Duration
	// FailOpen admits calls when Redis cannot be reached (Consume then
	// returns the error with allowed true); by default they are refused.
	FailOpen bool
}

// RateLimiter is fabric.RateLimiter on Redis: one Lua script per decision
// (consumeScript) on the key's counter hash ("<prefix>:{P}:rc:<name>:<key>",
// the window number and the tokens used, expiring at the window's end) and
// ban ("<prefix>:{P}:rb:<name>:<key>", with the ban's ttl), both in the
// key's partition. Every decision is made by Redis, atomically, on its own
// clock: the limit is exact across instances (no slack, no lease), and a
// reset, ban or unban counts everywhere at once. It starts no goroutine.
type RateLimiter struct {
	b    *Backend
	opts RateLimitOptions
	name string // length-prefixed, so that names and keys cannot run together
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
	opts.Interval = time.Duration(ms(opts.Interval)) * time.Millisecond
	return &RateLimiter{b: b, opts: opts, name: strconv.Itoa(len(opts.Name)) + ":" + opts.Name}
}

// Points returns the tokens per interval.
func (l *RateLimiter) Points() int { return l.opts.Points }

// Interval returns the refill period.
func (l *RateLimiter) Interval() time.Duration { return l.opts.Interval }

// keys returns key's counter and ban keys.
func (l *RateLimiter) keys(key string) (counter, ban string) {
	p := l.b.partition(key)
	return l.b.key(p, "rc", l.name+":"+key), l.b.key(p, "rb", l.name+":"+key)
}

// offset is where key's intervals start, in ms past a multiple of the
// interval: jetstream.RateLimiter's and memory.RateLimiter's shift.
func (l *RateLimiter) offset(key string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(key))
	iv := uint64(l.opts.Interval)
	return int64(h.Sum64()%iv) / int64(time.Millisecond)
}

// Consume implements fabric.RateLimiter: one script, one round trip.
// remaining is exact (the tokens left in the key's window); resetAfter is
// the time to the window's end, or to the ban's end. On a Redis failure,
// allowed is FailOpen.
func (l *RateLimiter) Consume(ctx context.Context, key string, cost int) (allowed bool, remaining int, resetAfter time.Duration, err error) {
	cost = max(cost, 1)
	counter, ban := l.keys(key)
	args := []string{
		strconv.Itoa(cost),
		strconv.Itoa(l.opts.Points),
		strconv.FormatInt(ms(l.opts.Interval), 10),
		strconv.FormatInt(l.offset(key), 10),
		strconv.FormatInt(ageMS(l.opts.BlockDuration), 10),
	}
	var out [3]int64
	err = l.b.call(ctx, "rate limit "+strconv.Quote(clip(key)), func(ctx context.Context) error {
		vs, err := consumeScript.run(ctx, l.b.client, []string{counter, ban}, args).AsIntSlice()
		if err != nil {
			return err
		}
		if len(vs) != 3 {
			return errors.New("consume: malformed reply")
		}
		copy(out[:], vs)
		return nil
	})
	if err != nil {
		return l.opts.FailOpen, 0, 0, err
	}
	return out[0] == 1, int(out[1]), time.Duration(out[2]) * time.Millisecond, nil
}

// Reset implements fabric.RateLimiter: key's count and ban are deleted.
func (l *RateLimiter) Reset(ctx context.Context, key string) error {
	counter, ban := l.keys(key)
	return l.b.callIdempotent(ctx, "rate limit reset "+strconv.Quote(clip(key)), func(ctx context.Context) error {
		return l.b.client.Do(ctx, l.b.client.B().Del().Key(counter, ban).Build()).Error()
	})
}

// Ban implements fabric.RateLimiter: key is refused for d (d ≤ 0 unbans).
func (l *RateLimiter) Ban(ctx context.Context, key string, d time.Duration) error {
	if d <= 0 {
		return l.Unban(ctx, key)
	}
	_, ban := l.keys(key)
	return l.b.callIdempotent(ctx, "rate limit ban "+strconv.Quote(clip(key)), func(ctx context.Context) error {
		return l.b.client.Do(ctx, l.b.client.B().Set().Key(ban).Value("1").PxMilliseconds(ms(d)).Build()).Error()
	})
}

// Unban implements fabric.RateLimiter.
func (l *RateLimiter) Unban(ctx context.Context, key string) error {
	_, ban := l.keys(key)
	return l.b.callIdempotent(ctx, "rate limit unban "+strconv.Quote(clip(key)), func(ctx context.Context) error {
		return l.b.client.Do(ctx, l.b.client.B().Del().Key(ban).Build()).Error()
	})
}

var _ fabric.RateLimiter = (*RateLimiter)(nil)
