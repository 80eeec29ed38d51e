package jetstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// Short intervals keep the tests fast: a heartbeat every 200ms, entries
// expire one second after their last refresh (the TTL resolution).
const (
	testHeartbeat = 200 * time.Millisecond
	testExpire    = time.Second
)

// presenceConf is what the tests vary: the core presence options and the
// store's replicas.
type presenceConf struct {
	fabric.PresenceOptions
	Replicas int
}

func presenceOpts() presenceConf {
	return presenceConf{PresenceOptions: fabric.PresenceOptions{
		Topics:            fabric.MatchTopics([]string{"room:*"}),
		HeartbeatInterval: testHeartbeat,
		ExpireAfter:       testExpire,
		Select:            selectName,
	}}
}

// startPresence starts one store and one Presence per instance, all on one
// bucket.
func startPresence(t *testing.T, insts []*fabrictest.Instance, opts presenceConf) []*fabric.Presence {
	t.Helper()
	ps := make([]*fabric.Presence, len(insts))
	for i, inst := range insts {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		store, err := jetstream.NewPresenceStore(ctx, inst.JS, jetstream.PresenceStoreOptions{
			Prefix: inst.Broker.Prefix(), Replicas: opts.Replicas, KeepAlive: opts.HeartbeatInterval, MarkerTTL: opts.ExpireAfter,
			Logger: fabrictest.Logger(t)})
		if err != nil {
			cancel()
			t.Fatalf("instance %d: %v", i, err)
		}
		p, err := fabric.NewPresence(ctx, inst.Node, store, opts.PresenceOptions)
		cancel()
		if err != nil {
			store.Close()
			t.Fatalf("instance %d: %v", i, err)
		}
		t.Cleanup(func() { p.Close(); store.Close() })
		ps[i] = p
	}
	return ps
}

func waitCount(t *testing.T, ps []*fabric.Presence, topic string, want int) {
	t.Helper()
	fabrictest.WaitFor(t, 10*time.Second, fmt.Sprintf("presence count %d on %s", want, topic), func() bool {
		for _, p := range ps {
			if n, _ := p.Count(context.Background(), topic); n != want {
				return false
			}
		}
		return true
	})
}

// TestPresenceMultiTabAcrossInstances: three tabs of one user on two
// instances are one entry; the user leaves only when the last tab anywhere
// closes; observers on either instance see each join and leave exactly once
// and in order.
func TestPresenceMultiTabAcrossInstances(t *testing.T) {
	insts := fabrictest.Cluster(t, 2, fabrictest.Options{Node: userNode()})
	ps := startPresence(t, insts, presenceOpts())
	ctx := testCtx(t, 60*time.Second)
	const room = "room:1"

	obs1 := dialUser(insts[1], "")
	if err := obs1.Subscribe(ctx, fabric.PresenceTopicPrefix+room); err != nil {
		t.Fatal(err)
	}
	if ev := mustPresence(t, obs1, room, 5*time.Second); ev.Event != "list" || len(ev.Members) != 0 {
		t.Fatalf("first event %+v, want an empty list", ev)
	}

	tabs := []struct {
		inst int
		user string
	}{{0, "alice"}, {0, "alice"}, {1, "alice"}}
	var alice []*wsclient.Client
	for i, tab := range tabs {
		c := dialUser(insts[tab.inst], tab.user)
		if err := c.Subscribe(ctx, room); err != nil {
			t.Fatal(err)
		}
		alice = append(alice, c)
		if i == 0 {
			ev := mustPresence(t, obs1, room, 5*time.Second)
			wantEvent(t, ev, "join", "alice")
			var d struct{ Name string }
			if err := json.Unmarshal(ev.Member.Data, &d); err != nil || d.Name != "Name of alice" {
				t.Fatalf("join data %s: want only the selected name", ev.Member.Data)
			}
		}
	}
	bob := dialUser(insts[1], "bob")
	if err := bob.Subscribe(ctx, room); err != nil {
		t.Fatal(err)
	}
	wantEvent(t, mustPresence(t, obs1, room, 5*time.Second), "join", "bob")
	waitCount(t, ps, room, 2)
	for i, p := range ps {
		list, err := p.List(ctx, room)
		if err != nil || !slices.Equal(keysOf(list), []string{"alice", "bob"}) {
			t.Fatalf("instance %d List = %v, %v; want alice and bob", i, keysOf(list), err)
		}
	}

	// A late observer on the other instance gets the current list first.
	obs0 := dialUser(insts[0], "")
	if err := obs0.Subscribe(ctx, fabric.PresenceTopicPrefix+room); err != nil {
		t.Fatal(err)
	}
	if ev := mustPresence(t, obs0, room, 5*time.Second); ev.Event != "list" || !slices.Equal(keysOf(ev.Members), []string{"alice", "bob"}) {
		t.Fatalf("late observer got %+v, want list [alice bob]", ev)
	}

	// Closing two of alice's three tabs (one per instance) leaves nobody.
	alice[0].Close()
	alice[2].Close()
	quiet(t, obs1, room, 4*testHeartbeat)
	if n, _ := ps[0].Count(ctx, room); n != 2 {
		t.Fatalf("count after closing two of three tabs = %d, want 2", n)
	}
	// The last tab closes on instance 0 while bob unsubscribes on instance
	// 1: nothing orders the two, but both observers must see the same two
	// leaves in the same order (the bucket's), and nothing else.
	alice[1].Close()
	if err := bob.Unsubscribe(ctx, room); err != nil {
		t.Fatal(err)
	}
	var orders [][]string
	for _, obs := range []*wsclient.Client{obs1, obs0} {
		var order []string
		for range 2 {
			ev := mustPresence(t, obs, room, 5*time.Second)
			if ev.Event != "leave" {
				t.Fatalf("got %s %q, want leaves", ev.Event, ev.Member.Key)
			}
			order = append(order, ev.Member.Key)
		}
		quiet(t, obs, room, 3*testHeartbeat)
		orders = append(orders, order)
	}
	if !slices.Equal(orders[0], orders[1]) || !slices.Equal(keysOf([]fabric.PresenceMember{{Key: orders[0][0]}, {Key: orders[0][1]}}), []string{"alice", "bob"}) {
		t.Fatalf("observers saw leaves %v and %v, want alice and bob once each, in the same order", orders[0], orders[1])
	}
	waitCount(t, ps, room, 0)

	// Rapid joins and leaves of one user on instance 0 reach an observer on
	// instance 1 in order: strictly alternating, none lost or merged.
	const room2, cycles = "room:2", 20
	if err := obs1.Subscribe(ctx, fabric.PresenceTopicPrefix+room2); err != nil {
		t.Fatal(err)
	}
	if ev := mustPresence(t, obs1, room2, 5*time.Second); ev.Event != "list" {
		t.Fatalf("got %+v, want list", ev)
	}
	carol := dialUser(insts[0], "carol")
	for range cycles {
		if err := carol.Subscribe(ctx, room2); err != nil {
			t.Fatal(err)
		}
		if err := carol.Unsubscribe(ctx, room2); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 2 * cycles {
		want := "join"
		if i%2 == 1 {
			want = "leave"
		}
		wantEvent(t, mustPresence(t, obs1, room2, 5*time.Second), want, "carol")
	}
	quiet(t, obs1, room2, 3*testHeartbeat)
}

// TestPresenceInstanceKilled: an instance dies without a word (its NATS
// server stops, connections are cut, nothing is cleaned up). Its users leave
// on the surviving instances within ExpireAfter plus one heartbeat, except
// a user who still has a tab elsewhere.
func TestPresenceInstanceKilled(t *testing.T) {
	insts := fabrictest.Cluster(t, 3, fabrictest.Options{Node: userNode()})
	// NATS batches expiries that fall within 250ms of each other (the age
	// check never fires more often: memstore.go, resetAgeChk), so the bound
	// is checked with a heartbeat longer than that batching.
	const hb, expire = 500 * time.Millisecond, 2 * time.Second
	opts := presenceOpts()
	opts.Replicas = 3
	opts.HeartbeatInterval, opts.ExpireAfter = hb, expire
	ps := startPresence(t, insts, opts)
	ctx := testCtx(t, 60*time.Second)
	const room = "room:k"
	victim := insts[2]

	var observers []*wsclient.Client
	for _, inst := range insts[:2] {
		obs := dialUser(inst, "")
		if err := obs.Subscribe(ctx, fabric.PresenceTopicPrefix+room); err != nil {
			t.Fatal(err)
		}
		if ev := mustPresence(t, obs, room, 5*time.Second); ev.Event != "list" {
			t.Fatalf("first event %+v, want list", ev)
		}
		observers = append(observers, obs)
	}
	join := func(inst *fabrictest.Instance, user string) {
		c := dialUser(inst, user)
		if err := c.Subscribe(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []string{"u1", "u2", "u3", "alice"} {
		join(victim, u)
	}
	join(insts[0], "alice") // alice survives on instance 0
	waitCount(t, ps, room, 4)
	for _, obs := range observers {
		for range 4 {
			if ev := mustPresence(t, obs, room, 5*time.Second); ev.Event != "join" {
				t.Fatalf("got %+v, want joins", ev)
			}
		}
	}

	killed := time.Now()
	victim.Kill()
	bound := expire + hb
	// Both observers are read at once, so that each leave is timed when it
	// arrives.
	type result struct {
		left map[string]time.Duration
		err  error
	}
	results := make([]chan result, len(observers))
	for i, obs := range observers {
		results[i] = make(chan result, 1)
		go func() {
			rctx, cancel := context.WithTimeout(ctx, bound+5*time.Second)
			defer cancel()
			left := map[string]time.Duration{}
			for len(left) < 3 {
				ev, err := nextPresence(rctx, t, obs, room, false)
				switch {
				case err != nil:
					results[i] <- result{left, err}
					return
				case ev.Event != "leave":
					results[i] <- result{left, fmt.Errorf("got %s %q, want leaves", ev.Event, ev.Member.Key)}
					return
				case ev.Member.Key == "alice":
					results[i] <- result{left, errors.New("alice left, but she still has a tab on a live instance")}
					return
				}
				if _, dup := left[ev.Member.Key]; dup {
					results[i] <- result{left, fmt.Errorf("second leave of %q", ev.Member.Key)}
					return
				}
				left[ev.Member.Key] = ev.At.Sub(killed)
			}
			results[i] <- result{left, nil}
		}()
	}
	for i, ch := range results {
		r := <-ch
		if r.err != nil {
			t.Fatalf("observer %d: %v (leaves so far %v)", i, r.err, r.left)
		}
		t.Logf("observer %d: leaves after the kill: %v (bound %s)", i, r.left, bound)
		for u, d := range r.left {
			if d > bound {
				t.Errorf("observer %d: %s left %s after the kill, more than expireAfter + one heartbeat (%s)", i, u, d, bound)
			}
		}
	}
	for _, obs := range observers {
		quiet(t, obs, room, 2*hb)
	}
	for _, p := range ps[:2] {
		list, _ := p.List(ctx, room)
		if !slices.Equal(keysOf(list), []string{"alice"}) {
			t.Fatalf("after the kill List = %v, want [alice]", keysOf(list))
		}
	}
}

// clientOf returns the node's connection whose user id is user.
func clientOf(t *testing.T, inst *fabrictest.Instance, user string) *fabric.Client {
	t.Helper()
	var found *fabric.Client
	fabrictest.WaitFor(t, 5*time.Second, "connection of "+user, func() bool {
		inst.Node.Each(func(c *fabric.Client) bool {
			if k, ok := fabric.UserKey(c.UserData()); ok && k == user {
				found = c
				return false
			}
			return true
		})
		return found != nil
	})
	return found
}

// TestPresenceAPIAndWire: Join, Leave, List and Count from server code, the
// exact JSON of every event, and heartbeats carrying the active keys.
func TestPresenceAPIAndWire(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: userNode()})
	ps := startPresence(t, []*fabrictest.Instance{inst}, presenceOpts())
	p := ps[0]
	ctx := testCtx(t, 30*time.Second)
	const topic = "lobby" // not selected by Topics: joined through the API only

	obs := dialUser(inst, "")
	if err := obs.Subscribe(ctx, fabric.PresenceTopicPrefix+topic); err != nil {
		t.Fatal(err)
	}
	e, err := obs.Next(ctx)
	if err != nil || e.Event != "list" || string(e.Data) != "[]" {
		t.Fatalf("got %+v %v, want an empty list", e, err)
	}
	dialUser(inst, "carol")
	carol := clientOf(t, inst, "carol")
	if err := p.Join(ctx, topic, carol); err != nil {
		t.Fatal(err)
	}
	// Join returns once this instance's view has the entry.
	if n, err := p.Count(ctx, topic); err != nil || n != 1 {
		t.Fatalf("Count right after Join = %d, %v; want 1", n, err)
	}
	e, err = obs.Next(ctx)
	if err != nil || e.Event != "join" || string(e.Data) != `{"key":"carol","data":{"name":"Name of carol"}}` {
		t.Fatalf("got %+v %v, want the join of carol with her selected data", e, err)
	}
	// The next heartbeat lists the active keys.
	for {
		e, err = obs.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Event == "heartbeat" {
			break
		}
	}
	if string(e.Data) != `["carol"]` {
		t.Fatalf("heartbeat data %s, want [\"carol\"]", e.Data)
	}
	if err := p.Join(ctx, topic, carol); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := p.Leave(ctx, topic, carol); err != nil {
		t.Fatal(err)
	}
	if n, _ := p.Count(ctx, topic); n != 0 {
		t.Fatalf("Count right after Leave = %d, want 0", n)
	}
	for {
		e, err = obs.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Event != "heartbeat" {
			break
		}
	}
	if e.Event != "leave" || string(e.Data) != `{"key":"carol","data":{"name":"Name of carol"}}` {
		t.Fatalf("got %s %s, want the leave of carol", e.Event, e.Data)
	}
	if err := p.Join(ctx, "__rpc", carol); err == nil {
		t.Fatal("Join on a reserved topic succeeded")
	}
	// Anonymous connections are one entry each.
	for range 2 {
		c := dialUser(inst, "")
		if err := c.Subscribe(ctx, "room:anon"); err != nil {
			t.Fatal(err)
		}
	}
	waitCount(t, ps, "room:anon", 2)
	list, _ := p.List(ctx, "room:anon")
	for _, m := range list {
		if !strings.HasPrefix(m.Key, "conn:") || string(m.Data) != "null" {
			t.Fatalf("anonymous member %+v, want a conn: key and null data", m)
		}
	}
}
