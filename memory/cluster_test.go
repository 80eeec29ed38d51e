package memory_test

import (
	"strings"
	"testing"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
)

func TestClusterAcrossNodes(t *testing.T) {
	b := newBackend(t, memory.Options{})
	a, other := newNode(t, b), newNode(t, b)
	ctx := ctxT(t)
	ca, cb := b.Cluster(a), b.Cluster(other)
	defer cb.Close()

	alice1, alice2, bob, anon := &recorder{}, &recorder{}, &recorder{}, &recorder{}
	c1 := a.Connect(alice1, "alice", "127.0.0.1:1")
	a.Connect(anon, nil, "127.0.0.1:2")
	c2 := other.Connect(alice2, map[string]any{"id": "alice"}, "127.0.0.1:3")
	other.Connect(bob, "bob", "127.0.0.1:4")
	if err := a.Subscribe(c1, "room:1"); err != nil {
		t.Fatal(err)
	}
	if err := other.Subscribe(c2, "room:1"); err != nil {
		t.Fatal(err)
	}
	if n, err := cb.Connections(ctx); err != nil || n != 4 {
		t.Fatalf("connections = %d, %v; want 4", n, err)
	}
	if n, err := ca.Subscribers(ctx, "room:1"); err != nil || n != 2 {
		t.Fatalf("subscribers = %d, %v; want 2", n, err)
	}
	if _, err := ca.Subscribers(ctx, `bad"topic`); err == nil {
		t.Fatal("an invalid topic was counted")
	}

	if err := ca.SendToUser(ctx, "alice", "inbox", "note", map[string]int{"n": 1}); err != nil {
		t.Fatal(err)
	}
	want := `{"topic":"inbox","event":"note","data":{"n":1}}`
	for i, r := range []*recorder{alice1, alice2} {
		if got := joinLines(r.payloads()); got != want {
			t.Fatalf("alice's connection %d got %q", i, got)
		}
	}
	if len(bob.payloads()) != 0 || len(anon.payloads()) != 0 {
		t.Fatal("a message to alice reached someone else")
	}
	if err := ca.SendToUser(ctx, "", "inbox", "note", nil); err == nil {
		t.Fatal("an empty user id was accepted")
	}
	if err := ca.SendToUser(ctx, "alice", "inbox", `bad"event`, nil); err == nil || !strings.Contains(err.Error(), "event") {
		t.Fatalf("an invalid event: %v", err)
	}

	// Once a leaves the cluster, only b's connections count.
	_ = ca.Close()
	_ = ca.Close()
	if n, _ := cb.Connections(ctx); n != 2 {
		t.Fatalf("connections after a left = %d, want 2", n)
	}
	if m := cb.Members(); m != 1 {
		t.Fatalf("members = %d, want 1", m)
	}
}

// TestClusterAdminAcrossNodes: a view registered without a node (an API
// process that hosts no connections, say) still lists, describes,
// unsubscribes and disconnects the members' connections; a member that
// left is no longer reached.
func TestClusterAdminAcrossNodes(t *testing.T) {
	b := newBackend(t, memory.Options{})
	a, other := newNode(t, b), newNode(t, b)
	ctx := ctxT(t)
	ca, cb := b.Cluster(a), b.Cluster(other)
	defer cb.Close()
	view := b.Cluster(nil)
	defer view.Close()

	alice1, alice2 := &closer{}, &closer{}
	c1 := a.Connect(alice1, "alice", "127.0.0.1:1")
	c2 := other.Connect(alice2, "alice", "127.0.0.1:2")
	for _, s := range []struct {
		n *fabric.Node
		c *fabric.Client
	}{{a, c1}, {other, c2}} {
		if err := s.n.Subscribe(s.c, "room:1"); err != nil {
			t.Fatal(err)
		}
	}
	if got, truncated, err := view.Channels(ctx, "room:*", 0); err != nil || truncated || got["room:1"] != 2 || len(got) != 1 {
		t.Fatalf("channels = %v, %v, %v", got, truncated, err)
	}
	infos, err := view.Info(ctx)
	if err != nil || len(infos) != 2 || infos[0].Connections != 1 || infos[1].Subscriptions != 1 {
		t.Fatalf("info = %+v, %v", infos, err)
	}
	if n, err := view.Unsubscribe(ctx, "alice", "room:1"); err != nil || n != 2 {
		t.Fatalf("unsubscribe = %d, %v", n, err)
	}
	// a leaves the cluster: its connection is out of reach.
	_ = ca.Close()
	if n, err := view.Disconnect(ctx, "alice", 4000, "bye"); err != nil || n != 1 {
		t.Fatalf("disconnect = %d, %v; want 1 (a left)", n, err)
	}
	if alice1.code != 0 || alice2.code != 4000 || alice2.reason != "bye" {
		t.Fatalf("closes: a %d, other %d %q", alice1.code, alice2.code, alice2.reason)
	}
	if _, err := view.Disconnect(ctx, "", 4000, ""); err == nil {
		t.Fatal("an empty user id was accepted")
	}
}

// closer is a transport that remembers how it was closed.
type closer struct {
	recorder
	code   int
	reason string
}

func (c *closer) Close(code int, reason string) { c.code, c.reason = code, reason }
