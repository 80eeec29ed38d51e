package backendtest

import (
	"fmt"
	"maps"
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

// testCluster: counts, topic lists, instance descriptions, direct messages
// to a user, and disconnecting or unsubscribing a user span every
// instance, whichever instance is asked.
func testCluster(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	ia, ib := d.Instance(t), d.Instance(t)
	na, nb := node(t, ia, nil), node(t, ib, nil)
	ca, cb := ia.Cluster(t, na), ib.Cluster(t, nb)
	views := map[string]fabric.ClusterView{"a": ca, "b": cb}
	ctx := ctxFor(t, 60*time.Second)

	// u1 has a connection on each instance, u2 one on b, and a has an
	// anonymous one.
	u1a, anon := newClosing(na, "u1"), newClosing(na, nil)
	u1b, u2 := newClosing(nb, "u1"), newClosing(nb, map[string]any{"id": "u2"})
	for _, sub := range []struct {
		c      *closing
		topics []string
	}{{u1a, []string{"x", "room:1"}}, {anon, []string{"room:1"}}, {u1b, []string{"x"}}, {u2, []string{"room:2"}}} {
		for _, topic := range sub.topics {
			if err := sub.c.node.Subscribe(sub.c.client, topic); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, cv := range views {
		waitFor(t, 15*time.Second, "counts of both instances from "+name, func() bool {
			conns, err1 := cv.Connections(ctx)
			subs, err2 := cv.Subscribers(ctx, "x")
			return err1 == nil && err2 == nil && conns == 4 && subs == 2
		})
	}

	t.Run("SendToUser", func(t *testing.T) {
		waitFor(t, 15*time.Second, "a message to u1 to reach both of u1's connections", func() bool {
			if err := ca.SendToUser(ctx, "u1", "inbox", "dm", "hi"); err != nil {
				t.Fatal(err)
			}
			return len(u1a.on("inbox")) > 0 && len(u1b.on("inbox")) > 0
		})
		if n := len(anon.on("inbox")) + len(u2.on("inbox")); n != 0 {
			t.Fatalf("other connections got %d messages for u1", n)
		}
	})

	t.Run("Channels", func(t *testing.T) {
		for name, cv := range views {
			for _, tc := range []struct {
				pattern   string
				limit     int
				want      map[string]int
				truncated bool
			}{
				{"", 0, map[string]int{"x": 2, "room:1": 2, "room:2": 1}, false},
				{"room:*", 0, map[string]int{"room:1": 2, "room:2": 1}, false},
				{"", 1, map[string]int{"room:1": 2}, true},              // the first in byte order
				{"", 2, map[string]int{"room:1": 2, "room:2": 1}, true}, // a prefix, counts complete
				{"room:*", 2, map[string]int{"room:1": 2, "room:2": 1}, false},
				{"nothing:*", 0, map[string]int{}, false},
			} {
				got, truncated, err := cv.Channels(ctx, tc.pattern, tc.limit)
				if err != nil || truncated != tc.truncated || !maps.Equal(got, tc.want) {
					t.Errorf("from %s: Channels(%q, %d) = %v, %v, %v; want %v, %v", name, tc.pattern, tc.limit, got, truncated, err, tc.want, tc.truncated)
				}
			}
		}
	})

	t.Run("Info", func(t *testing.T) {
		want := map[string]fabric.InstanceInfo{
			na.ID(): {ID: na.ID(), Connections: 2, Subscriptions: 3, Topics: 2},
			nb.ID(): {ID: nb.ID(), Connections: 2, Subscriptions: 2, Topics: 2},
		}
		for name, cv := range views {
			infos, err := cv.Info(ctx)
			if err != nil || len(infos) != 2 {
				t.Fatalf("from %s: Info = %+v, %v; want 2 instances", name, infos, err)
			}
			for _, in := range infos {
				w, ok := want[in.ID]
				if !ok || in.Connections != w.Connections || in.Subscriptions != w.Subscriptions || in.Topics != w.Topics || in.Uptime <= 0 {
					t.Errorf("from %s: instance %+v; want %+v with an uptime", name, in, w)
				}
			}
		}
	})

	t.Run("Unsubscribe", func(t *testing.T) {
		if n, err := ca.Unsubscribe(ctx, "u1", "x"); err != nil || n != 2 {
			t.Fatalf("Unsubscribe(u1, x) = %d, %v; want 2 (one connection per instance)", n, err)
		}
		if u1a.client.Subscribed("x") || u1b.client.Subscribed("x") || !u1a.client.Subscribed("room:1") {
			t.Fatal("u1 is still on x, or lost room:1")
		}
		for name, cv := range views {
			if n, err := cv.Subscribers(ctx, "x"); err != nil || n != 0 {
				t.Errorf("from %s: Subscribers(x) = %d, %v after the unsubscribe", name, n, err)
			}
		}
		if n, err := cb.Unsubscribe(ctx, "u1", "x"); err != nil || n != 0 {
			t.Errorf("a second Unsubscribe(u1, x) = %d, %v; want 0", n, err)
		}
		if n, err := cb.Unsubscribe(ctx, "nobody", "room:1"); err != nil || n != 0 {
			t.Errorf("Unsubscribe(nobody) = %d, %v; want 0", n, err)
		}
		if !anon.client.Subscribed("room:1") {
			t.Error("an anonymous connection was unsubscribed")
		}
		if _, err := ca.Unsubscribe(ctx, "", "room:1"); err == nil {
			t.Error("an empty user id was accepted")
		}
		if _, err := ca.Unsubscribe(ctx, "u1", `bad"topic`); err == nil {
			t.Error("an invalid topic was accepted")
		}
	})

	t.Run("Disconnect", func(t *testing.T) {
		if n, err := cb.Disconnect(ctx, "u1", 4001, "bye"); err != nil || n != 2 {
			t.Fatalf("Disconnect(u1) = %d, %v; want 2 (one connection per instance)", n, err)
		}
		for _, c := range []*closing{u1a, u1b} {
			if code, reason, closes := c.closedWith(); closes != 1 || code != 4001 || reason != "bye" {
				t.Errorf("u1's connection on %s: closed %d times with %d %q; want once with 4001 bye", c.node.ID(), closes, code, reason)
			}
		}
		for _, c := range []*closing{anon, u2} {
			if _, _, closes := c.closedWith(); closes != 0 {
				t.Error("a connection of another user was closed")
			}
		}
		for name, cv := range views {
			waitFor(t, 15*time.Second, "the closed connections gone, from "+name, func() bool {
				n, err := cv.Connections(ctx)
				return err == nil && n == 2
			})
		}
		if n, err := ca.Disconnect(ctx, "u1", 4001, "bye"); err != nil || n != 0 {
			t.Errorf("a second Disconnect(u1) = %d, %v; want 0", n, err)
		}
		if _, err := ca.Disconnect(ctx, "", 1000, ""); err == nil {
			t.Error("an empty user id was accepted")
		}
	})
}

// closing is a recorded connection whose Close disconnects it from its
// node at once and remembers the code and reason, as an edge would.
type closing struct {
	*recorder
	node   *fabric.Node
	client *fabric.Client

	mu     sync.Mutex
	code   int
	reason string
	closes int
}

func newClosing(n *fabric.Node, userData any) *closing {
	c := &closing{recorder: newRecorder(), node: n}
	c.client = n.Connect(c, userData, "test")
	return c
}

// Close implements fabric.Transport.
func (c *closing) Close(code int, reason string) {
	c.mu.Lock()
	c.code, c.reason = code, reason
	c.closes++
	c.mu.Unlock()
	c.node.Disconnect(c.client, code, reason)
}

func (c *closing) closedWith() (code int, reason string, closes int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code, c.reason, c.closes
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
