package backendtest

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// testLimiter: instances sharing a limit admit exactly its points per key
// and interval between them, however hard they are pushed; bans, unbans and
// resets reach every instance.
func testLimiter(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	o := LimiterOptions{Name: "conformance", Points: 20, Interval: time.Hour}
	ls := []fabric.RateLimiter{d.Instance(t).Limiter(t, o), d.Instance(t).Limiter(t, o)}
	ctx := ctxFor(t, 60*time.Second)
	// A key's interval may end at any moment (keys are spread over the
	// interval): use one that has most of its interval ahead.
	var key string
	for i := 0; key == ""; i++ {
		k := fmt.Sprintf("user:%d", i)
		ok, _, reset, err := ls[0].Consume(ctx, k, 1)
		if err != nil || !ok {
			t.Fatalf("first Consume of %s: %v %v", k, ok, err)
		}
		if reset > time.Minute {
			key = k
		}
	}
	var admitted atomic.Int64
	admitted.Add(1)
	var wg sync.WaitGroup
	for g := range 8 {
		l := ls[g%2]
		wg.Go(func() {
			for {
				ok, _, _, err := l.Consume(ctx, key, 1)
				if err != nil {
					t.Errorf("Consume: %v", err)
					return
				}
				if !ok {
					return
				}
				admitted.Add(1)
			}
		})
	}
	wg.Wait()
	if n := admitted.Load(); n != int64(o.Points) {
		t.Fatalf("admitted %d calls in one interval across two instances, want exactly %d", n, o.Points)
	}
	for i, l := range ls {
		if ok, _, reset, _ := l.Consume(ctx, key, 1); ok || reset <= 0 {
			t.Fatalf("instance %d admitted a call past the limit (or no reset time: %s)", i, reset)
		}
	}

	if err := ls[0].Reset(ctx, key); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the reset to reach the other instance", func() bool {
		ok, _, _, _ := ls[1].Consume(ctx, key, 1)
		return ok
	})

	const banned = "user:banned"
	if err := ls[0].Ban(ctx, banned, time.Minute); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the ban to reach the other instance", func() bool {
		ok, _, reset, _ := ls[1].Consume(ctx, banned, 1)
		return !ok && reset > 30*time.Second
	})
	if err := ls[1].Unban(ctx, banned); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the unban to reach the first instance", func() bool {
		ok, _, _, _ := ls[0].Consume(ctx, banned, 1)
		return ok
	})
}

// testCluster: counts and direct messages to a user span every instance.
func testCluster(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	ia, ib := d.Instance(t), d.Instance(t)
	na, nb := node(t, ia, nil), node(t, ib, nil)
	ca, cb := ia.Cluster(t, na), ib.Cluster(t, nb)
	ctx := ctxFor(t, 30*time.Second)

	u1a, anon, u1b := newRecorder(), newRecorder(), newRecorder()
	c1 := na.Connect(u1a, "u1", "test")
	c2 := na.Connect(anon, nil, "test")
	c3 := nb.Connect(u1b, "u1", "test")
	for _, sub := range []struct {
		n *fabric.Node
		c *fabric.Client
	}{{na, c1}, {nb, c3}} {
		if err := sub.n.Subscribe(sub.c, "x"); err != nil {
			t.Fatal(err)
		}
	}
	_ = c2
	for name, cv := range map[string]fabric.ClusterView{"a": ca, "b": cb} {
		waitFor(t, 15*time.Second, "counts of both instances from "+name, func() bool {
			conns, err1 := cv.Connections(ctx)
			subs, err2 := cv.Subscribers(ctx, "x")
			return err1 == nil && err2 == nil && conns == 3 && subs == 2
		})
	}
	waitFor(t, 15*time.Second, "a message to u1 to reach both of u1's connections", func() bool {
		if err := ca.SendToUser(ctx, "u1", "inbox", "dm", "hi"); err != nil {
			t.Fatal(err)
		}
		return len(u1a.on("inbox")) > 0 && len(u1b.on("inbox")) > 0
	})
	if n := len(anon.on("inbox")); n != 0 {
		t.Fatalf("an anonymous connection got %d messages for u1", n)
	}
}

// testLeases: one holder at a time, refresh keeps it, release and expiry
// hand it over.
func testLeases(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	l1, l2 := d.Instance(t).Leases, d.Instance(t).Leases
	if l1 == nil || l2 == nil {
		t.Fatal("the backend has no lease store")
	}
	ctx := ctxFor(t, 30*time.Second)
	const name, ttl = "pg:table_changes", 2 * time.Second
	must := func(l fabric.LeaseStore, holder string, want bool) {
		t.Helper()
		got, err := l.Acquire(ctx, name, holder, ttl)
		if err != nil || got != want {
			t.Fatalf("Acquire(%s) = %v, %v; want %v", holder, got, err, want)
		}
	}
	must(l1, "h1", true)
	must(l2, "h2", false)
	must(l1, "h1", true) // refresh
	must(l2, "h2", false)
	if err := l1.Release(ctx, name, "h1"); err != nil {
		t.Fatal(err)
	}
	must(l2, "h2", true)
	must(l1, "h1", false)
	if err := l1.Release(ctx, name, "h1"); err != nil { // not the holder: no effect
		t.Fatal(err)
	}
	must(l1, "h1", false)
	// h2 stops refreshing: h1 gets the lease once it expires, not before.
	taken := time.Now()
	waitFor(t, ttl+5*time.Second, "the lease to expire", func() bool {
		ok, err := l1.Acquire(ctx, name, "h1", ttl)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	})
	if waited := time.Since(taken); waited < ttl/2 {
		t.Fatalf("h1 took the lease %s after h2's last refresh, before its ttl %s", waited, ttl)
	}
}
