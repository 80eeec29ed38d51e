package fabric_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats-server/v2/server"
)

const crossMessages = 10_000

// crossInstance subscribes a WebSocket client on a, publishes n messages on
// b through the Node API, and checks that all arrive on a, in order.
func crossInstance(t *testing.T, a, b *fabrictest.Instance, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := a.Dial(wsclient.Options{Buffer: n + 16})
	const topic = "chat:room.1 ✓"
	if err := c.Subscribe(ctx, topic); err != nil {
		t.Fatal(err)
	}
	waitForInterest(t, ctx, b, c, topic)
	for i := range n {
		if _, err := b.Node.Publish(ctx, topic, "msg", i); err != nil {
			t.Fatal(err)
		}
	}
	for want := 0; want < n; want++ {
		e, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("after %d messages: %v", want, err)
		}
		var got int
		if err := json.Unmarshal(e.Data, &got); err != nil || e.Topic != topic || e.Event != "msg" {
			t.Fatalf("message %d: unexpected envelope %+v (%v)", want, e, err)
		}
		if got != want {
			t.Fatalf("message %d arrived as %d: out of order or lost", want, got)
		}
	}
}

// waitForInterest publishes probes from b until c (subscribed on another
// instance) sees one: NATS propagates subscription interest between servers
// asynchronously.
func waitForInterest(t *testing.T, ctx context.Context, b *fabrictest.Instance, c *wsclient.Client, topic string) {
	t.Helper()
	for i := 0; ; i++ {
		if _, err := b.Node.Publish(ctx, topic, "probe", i); err != nil {
			t.Fatal(err)
		}
		pctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		e, err := c.Next(pctx)
		cancel()
		if err == nil && e.Event == "probe" {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("subscription interest never reached the publishing instance")
		}
	}
	// Drain probes still in flight so the test sees only its own messages.
	for {
		pctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		_, err := c.Next(pctx)
		cancel()
		if err != nil {
			return
		}
	}
}

func TestClusterByRoutes(t *testing.T) {
	insts := fabrictest.Cluster(t, 2, fabrictest.Options{})
	crossInstance(t, insts[0], insts[1], crossMessages)
}

func TestExternalNATS(t *testing.T) {
	t.Run("started", func(t *testing.T) {
		ns := fabrictest.StartNATS(t, nil)
		a := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: "ext1"})
		b := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: "ext1"})
		crossInstance(t, a, b, crossMessages)
	})
	t.Run("machine", func(t *testing.T) {
		url := fabrictest.MachineNATS(t)
		if url == "" {
			t.Skip("no NATS server on 127.0.0.1:4222")
		}
		prefix := fabrictest.TestPrefix(t) // the machine's server is shared
		a := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: url, Prefix: prefix})
		b := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: url, Prefix: prefix})
		crossInstance(t, a, b, crossMessages)
	})
}

// TestPrefixIsolation: instances with different subject prefixes share a
// NATS server without seeing each other's topics.
func TestPrefixIsolation(t *testing.T) {
	ns := fabrictest.StartNATS(t, nil)
	a := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: "tenantA"})
	b := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: "tenantB"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := a.Dial(wsclient.Options{})
	if err := c.Subscribe(ctx, "news"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Node.Publish(ctx, "news", "leak", 1); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Node.Publish(ctx, "news", "mine", 2); err != nil {
		t.Fatal(err)
	}
	e, err := c.Next(ctx)
	if err != nil || e.Event != "mine" {
		t.Fatalf("got %+v, %v; want only tenant A's message", e, err)
	}
}

func TestLocalCountsAndSendTo(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: fabric.Config{Hooks: userHeaderHooks()}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var clients []*wsclient.Client
	for i := range 3 {
		h := map[string][]string{"X-User": {fmt.Sprint("u", i%2)}}
		c := inst.Dial(wsclient.Options{Header: h})
		if err := c.Subscribe(ctx, "room"); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	if got := inst.Node.Connections(); got != 3 {
		t.Fatalf("Connections() = %d, want 3", got)
	}
	if got := inst.Node.Subscribers("room"); got != 3 {
		t.Fatalf("Subscribers(room) = %d, want 3", got)
	}
	n, err := inst.Node.SendTo(func(ud any) bool { return ud == "u1" }, "dm", "hello", "only u1")
	if err != nil || n != 1 {
		t.Fatalf("SendTo matched %d (%v), want 1", n, err)
	}
	e, err := clients[1].Next(ctx)
	if err != nil || e.Topic != "dm" || string(e.Data) != `"only u1"` {
		t.Fatalf("u1 got %+v %v", e, err)
	}
	if _, err := inst.Node.Topic("room").Increment(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		e, err := c.Next(ctx)
		if err != nil || e.Event != "increment" || string(e.Data) != "2" {
			t.Fatalf("client %d got %+v %v, want increment 2", i, e, err)
		}
	}
	clients[0].Close()
	fabrictest.WaitFor(t, 5*time.Second, "disconnect", func() bool { return inst.Node.Subscribers("room") == 2 })
}

func TestPublishValidation(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	ctx := context.Background()
	for _, tc := range []struct{ topic, event string }{
		{"", "e"}, {"bad\x00", "e"}, {`quo"te`, "e"}, {"t", ""}, {"t", `ev\il`}, {string(make([]byte, 300)), "e"},
	} {
		if _, err := inst.Node.Publish(ctx, tc.topic, tc.event, nil); err == nil {
			t.Errorf("Publish(%q, %q) succeeded, want a validation error", tc.topic, tc.event)
		}
	}
	if _, err := inst.Node.Publish(ctx, "t", "e", json.RawMessage(`{bad`)); err == nil {
		t.Error("Publish with invalid raw JSON succeeded")
	}
	if _, err := inst.Node.Publish(ctx, "t", "e", nil, func(o *fabric.PublishOptions) { o.Persist = true }); err == nil {
		t.Error("Persist without a history backend succeeded")
	}
}

// userHeaderHooks authenticates every connection as its X-User header.
func userHeaderHooks() fabric.Hooks {
	return fabric.Hooks{Connect: func(r *http.Request) (any, error) {
		return r.Header.Get("X-User"), nil
	}}
}

// TestLeafNode: an instance attached by a leaf remote to a separately
// started hub sees what is published on the hub's side, and the hub's side
// sees what it publishes.
func TestLeafNode(t *testing.T) {
	hub := fabrictest.StartNATS(t, func(o *server.Options) {
		o.LeafNode.Host, o.LeafNode.Port = "127.0.0.1", -1
	})
	hubLeaf := fmt.Sprintf("nats://127.0.0.1:%d", leafPort(t, hub))
	prefix := fabrictest.TestPrefix(t)
	leaf := fabrictest.NewInstance(t, fabrictest.Options{Prefix: prefix, Embed: embed.Options{LeafRemotes: []string{hubLeaf}}})
	onHub := fabrictest.NewInstance(t, fabrictest.Options{Prefix: prefix, NATSURL: hub.ClientURL()})
	fabrictest.WaitFor(t, 20*time.Second, "leaf connection", func() bool { return hub.NumLeafNodes() == 1 })
	t.Run("hub to leaf", func(t *testing.T) { crossInstance(t, leaf, onHub, 1000) })
	t.Run("leaf to hub", func(t *testing.T) { crossInstance(t, onHub, leaf, 1000) })
}

func leafPort(t *testing.T, s *server.Server) int {
	v, err := s.Varz(nil)
	if err != nil || v.LeafNode.Port <= 0 {
		t.Fatalf("hub has no leafnode port: %v", err)
	}
	return v.LeafNode.Port
}
