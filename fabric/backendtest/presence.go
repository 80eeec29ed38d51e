package backendtest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Presence timings of the tests: short, so that expiry is seen quickly
// (NATS TTLs have a resolution of one second).
const (
	testHeartbeat = 200 * time.Millisecond
	testExpire    = time.Second
)

// startPresence runs fabric.Presence for n on store.
func startPresence(t *testing.T, n *fabric.Node, store fabric.PresenceStore) *fabric.Presence {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := fabric.NewPresence(ctx, n, store, fabric.PresenceOptions{
		HeartbeatInterval: testHeartbeat,
		ExpireAfter:       testExpire,
		Topics:            fabric.MatchTopics([]string{"room:*"}),
		Select:            func(ud any) any { return map[string]any{"name": ud} },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// presenceEvents returns the list, join and leave events r got for topic,
// as "list:a,b", "join:a", "leave:a".
func presenceEvents(t *testing.T, r *recorder, topic string) []string {
	var out []string
	for _, m := range r.on(fabric.PresenceTopicPrefix + topic) {
		switch m.Event {
		case "list":
			var ms []fabric.PresenceMember
			if err := json.Unmarshal(m.Data, &ms); err != nil {
				t.Fatalf("list %s: %v", m.Data, err)
			}
			keys := make([]string, len(ms))
			for i, x := range ms {
				keys[i] = x.Key
			}
			slices.Sort(keys)
			out = append(out, "list:"+strings.Join(keys, ","))
		case "join", "leave":
			var x fabric.PresenceMember
			if err := json.Unmarshal(m.Data, &x); err != nil {
				t.Fatalf("%s %s: %v", m.Event, m.Data, err)
			}
			if want := fmt.Sprintf(`{"name":%q}`, x.Key); string(x.Data) != want {
				t.Fatalf("%s of %s carries %s, want %s", m.Event, x.Key, x.Data, want)
			}
			out = append(out, m.Event+":"+x.Key)
		}
	}
	return out
}

// waitEvents waits until r has exactly want (and fails on anything else).
func waitEvents(t *testing.T, r *recorder, topic string, want []string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(15 * time.Second)
	for {
		got = presenceEvents(t, r, topic)
		if len(got) >= len(want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("presence events %v, want %v", got, want)
		}
		select {
		case <-r.notify:
		case <-time.After(10 * time.Millisecond):
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("presence events %v, want %v", got, want)
	}
}

// testPresence: joins and leaves across two instances, one member per user
// however many tabs, every event once and in order, the same view on both.
func testPresence(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	ia, ib := d.Instance(t), d.Instance(t)
	na, nb := node(t, ia, nil), node(t, ib, nil)
	pa, pb := startPresence(t, na, ia.Presence), startPresence(t, nb, ib.Presence)
	ctx := ctxFor(t, 60*time.Second)
	const room = "room:1"

	obs := newRecorder()
	if err := nb.Subscribe(nb.Connect(obs, nil, "test"), fabric.PresenceTopicPrefix+room); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, obs, room, []string{"list:"})

	tab1 := na.Connect(newRecorder(), "alice", "test")
	if err := na.Subscribe(tab1, room); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, obs, room, []string{"list:", "join:alice"})
	tab2 := nb.Connect(newRecorder(), "alice", "test")
	if err := pb.Join(ctx, room, tab2); err != nil { // the API path, waited for
		t.Fatal(err)
	}
	bob := nb.Connect(newRecorder(), "bob", "test")
	if err := nb.Subscribe(bob, room); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, obs, room, []string{"list:", "join:alice", "join:bob"})
	for _, p := range []*fabric.Presence{pa, pb} {
		waitFor(t, 10*time.Second, "two members on every instance", func() bool {
			n, _ := p.Count(ctx, room)
			return n == 2
		})
	}
	late := newRecorder()
	if err := na.Subscribe(na.Connect(late, nil, "test"), fabric.PresenceTopicPrefix+room); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, late, room, []string{"list:alice,bob"})

	na.Unsubscribe(tab1, room)    // alice still has a tab on b
	nb.Disconnect(tab2, 1000, "") // now she has none
	waitEvents(t, obs, room, []string{"list:", "join:alice", "join:bob", "leave:alice"})
	if err := pb.Leave(ctx, room, bob); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, obs, room, []string{"list:", "join:alice", "join:bob", "leave:alice", "leave:bob"})
	waitEvents(t, late, room, []string{"list:alice,bob", "leave:alice", "leave:bob"})
	for _, p := range []*fabric.Presence{pa, pb} {
		waitFor(t, 10*time.Second, "no members left", func() bool {
			ms, _ := p.List(ctx, room)
			return len(ms) == 0
		})
	}
}

// testPresenceExpiry: an entry its instance stops refreshing (the instance
// died) expires, and its user leaves everywhere.
func testPresenceExpiry(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	ia := d.Instance(t)
	na := node(t, ia, nil)
	pa := startPresence(t, na, ia.Presence)
	ctx := ctxFor(t, 30*time.Second)
	const room = "room:ghost"
	obs := newRecorder()
	if err := na.Subscribe(na.Connect(obs, nil, "test"), fabric.PresenceTopicPrefix+room); err != nil {
		t.Fatal(err)
	}
	dead := d.Instance(t).Presence // what the dead instance wrote through
	w := dead.Put(fabric.PresenceEntry{Topic: room, Key: "ghost", Instance: "dead-instance", Data: json.RawMessage(`{"name":"ghost"}`)}, testExpire)
	if err := w.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	waitEvents(t, obs, room, []string{"list:", "join:ghost"})
	put := time.Now()
	waitFor(t, testExpire+5*time.Second, "the unrefreshed entry to expire", func() bool {
		n, _ := pa.Count(ctx, room)
		return n == 0
	})
	waitEvents(t, obs, room, []string{"list:", "join:ghost", "leave:ghost"})
	t.Logf("expired %s after its last refresh (ttl %s)", time.Since(put).Round(10*time.Millisecond), testExpire)
}
