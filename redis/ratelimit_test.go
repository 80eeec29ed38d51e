package redis_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
)

// TestRateLimiter: remaining counts down exactly, a costly call that does
// not fit is refused without a ban, running out bans for BlockDuration,
// and the window refills.
func TestRateLimiter(t *testing.T) {
	b := sharedBackend(t, redis.Options{})
	ctx := context.Background()
	l := b.RateLimiter(redis.RateLimitOptions{Name: "t", Points: 3, Interval: 400 * time.Millisecond})
	// A key with most of its window ahead.
	var key string
	for i := 0; key == ""; i++ {
		k := "k" + string(rune('a'+i%26)) + time.Now().Format("150405.000000")
		ok, rem, reset, err := l.Consume(ctx, k, 1)
		if err != nil || !ok || rem != 2 {
			t.Fatalf("first Consume: %v %d %v", ok, rem, err)
		}
		if reset > 250*time.Millisecond {
			key = k
		}
	}
	if ok, rem, _, _ := l.Consume(ctx, key, 5); ok || rem != 2 {
		t.Fatalf("a call costing more than the points: ok %v remaining %d", ok, rem)
	}
	for want := 1; want >= 0; want-- {
		if ok, rem, _, err := l.Consume(ctx, key, 1); !ok || rem != want || err != nil {
			t.Fatalf("Consume: %v %d %v; want remaining %d", ok, rem, err, want)
		}
	}
	if ok, _, reset, _ := l.Consume(ctx, key, 1); ok || reset <= 0 || reset > 400*time.Millisecond {
		t.Fatalf("past the limit: ok %v reset %s", ok, reset)
	}
	fabrictest.WaitFor(t, 2*time.Second, "the window to refill", func() bool {
		ok, _, _, _ := l.Consume(ctx, key, 1)
		return ok
	})

	banning := b.RateLimiter(redis.RateLimitOptions{Name: "ban", Points: 1, Interval: time.Hour, BlockDuration: time.Minute})
	if ok, _, _, _ := banning.Consume(ctx, "x", 1); !ok {
		t.Fatal("first call refused")
	}
	if ok, _, reset, _ := banning.Consume(ctx, "x", 1); ok || reset < 59*time.Second {
		t.Fatalf("running out: ok %v reset %s; want a ban of a minute", ok, reset)
	}
	if err := banning.Reset(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if ok, _, _, _ := banning.Consume(ctx, "x", 1); !ok {
		t.Fatal("refused after Reset")
	}
}

// TestRateLimiterRedisDown: a decision Redis cannot make is an error
// wrapping fabric.ErrBackendUnavailable, allowed per FailOpen.
func TestRateLimiterRedisDown(t *testing.T) {
	p := startRedis(t)
	b := newBackend(t, redis.Options{URL: p.url(), Prefix: fabrictest.TestPrefix(t), Timeout: time.Second})
	closed := b.RateLimiter(redis.RateLimitOptions{Name: "closed"})
	open := b.RateLimiter(redis.RateLimitOptions{Name: "open", FailOpen: true})
	p.kill()
	ctx := context.Background()
	if ok, _, _, err := closed.Consume(ctx, "k", 1); ok || !errors.Is(err, fabric.ErrBackendUnavailable) {
		t.Fatalf("fail closed: %v %v", ok, err)
	}
	if ok, _, _, err := open.Consume(ctx, "k", 1); !ok || !errors.Is(err, fabric.ErrBackendUnavailable) {
		t.Fatalf("fail open: %v %v", ok, err)
	}
}
