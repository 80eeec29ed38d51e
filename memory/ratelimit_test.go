package memory_test

import (
	"testing"
	"time"

	"github.com/fabricrt/fabric/memory"
)

type consumeResult struct {
	allowed   bool
	remaining int
	reset     time.Duration
}

func consume(t *testing.T, l *memory.RateLimiter, key string, cost int) consumeResult {
	t.Helper()
	ok, rem, reset, err := l.Consume(ctxT(t), key, cost)
	if err != nil {
		t.Fatal(err)
	}
	return consumeResult{ok, rem, reset}
}

func TestRateLimitPointsAndReset(t *testing.T) {
	b := newBackend(t, memory.Options{})
	l := b.RateLimiter(memory.RateLimitOptions{Points: 3, Interval: time.Hour})
	shared := b.RateLimiter(memory.RateLimitOptions{Points: 3, Interval: time.Hour})
	other := b.RateLimiter(memory.RateLimitOptions{Name: "other", Points: 3, Interval: time.Hour})
	for want := 2; want >= 0; want-- {
		l2 := l
		if want == 1 {
			l2 = shared // the same name shares the count
		}
		r := consume(t, l2, "k", 1)
		if !r.allowed || r.remaining != want || r.reset <= 0 || r.reset > time.Hour {
			t.Fatalf("call %d: %+v", 3-want, r)
		}
	}
	if r := consume(t, l, "k", 1); r.allowed || r.remaining != 0 {
		t.Fatalf("fourth call: %+v", r)
	}
	if r := consume(t, other, "k", 1); !r.allowed {
		t.Fatalf("another name shares the count: %+v", r)
	}
	if r := consume(t, l, "k2", 4); r.allowed || r.remaining != 3 {
		t.Fatalf("a call costing more than Points: %+v", r)
	}
	if err := shared.Reset(ctxT(t), "k"); err != nil {
		t.Fatal(err)
	}
	if r := consume(t, l, "k", 2); !r.allowed || r.remaining != 1 {
		t.Fatalf("after reset: %+v", r)
	}
}

func TestRateLimitWindowRefills(t *testing.T) {
	b := newBackend(t, memory.Options{})
	const iv = 50 * time.Millisecond
	l := b.RateLimiter(memory.RateLimitOptions{Points: 2, Interval: iv})
	consume(t, l, "k", 2)
	r := consume(t, l, "k", 1)
	if r.allowed || r.reset <= 0 || r.reset > iv {
		t.Fatalf("exhausted: %+v", r)
	}
	start := time.Now()
	waitFor(t, "the bucket to refill", func() bool { return consume(t, l, "k", 1).allowed })
	if el := time.Since(start); el > r.reset+time.Second {
		t.Fatalf("refilled after %v, announced %v", el, r.reset)
	}
}

func TestRateLimitBan(t *testing.T) {
	b := newBackend(t, memory.Options{})
	ctx := ctxT(t)
	l := b.RateLimiter(memory.RateLimitOptions{Name: "ban", Points: 2, Interval: time.Hour, BlockDuration: time.Hour})
	peer := b.RateLimiter(memory.RateLimitOptions{Name: "ban", Points: 2, Interval: time.Hour, BlockDuration: time.Hour})
	consume(t, l, "k", 2)
	if r := consume(t, l, "k", 1); r.allowed || r.reset != time.Hour {
		t.Fatalf("exhausted with BlockDuration: %+v, want banned for 1h", r)
	}
	if r := consume(t, peer, "k", 1); r.allowed || r.reset <= 59*time.Minute {
		t.Fatalf("the ban does not reach a limiter of the same name: %+v", r)
	}
	if err := l.Reset(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if r := consume(t, peer, "k", 1); !r.allowed {
		t.Fatalf("reset did not lift the ban: %+v", r)
	}
	// Explicit bans.
	if err := peer.Ban(ctx, "x", time.Minute); err != nil {
		t.Fatal(err)
	}
	if r := consume(t, l, "x", 1); r.allowed || r.reset <= 0 || r.reset > time.Minute {
		t.Fatalf("banned: %+v", r)
	}
	if err := l.Unban(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if r := consume(t, peer, "x", 1); !r.allowed {
		t.Fatalf("unbanned: %+v", r)
	}
	if err := l.Ban(ctx, "y", 20*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a short ban to end", func() bool { return consume(t, l, "y", 1).allowed })
}

func TestRateLimitForgetsIdleKeys(t *testing.T) {
	b := newBackend(t, memory.Options{SweepInterval: 5 * time.Millisecond})
	l := b.RateLimiter(memory.RateLimitOptions{Name: "idle", Points: 5, Interval: 20 * time.Millisecond})
	for i := range 100 {
		consume(t, l, string(rune('a'+i%26))+string(rune('a'+i/26)), 1)
	}
	if err := l.Ban(ctxT(t), "banned", 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if n := l.Keys(); n == 0 {
		t.Fatal("no keys tracked")
	}
	waitFor(t, "idle keys and ended bans to be swept", func() bool { return l.Keys() == 0 })
}
