package jetstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

func startClusters(t *testing.T, insts []*fabrictest.Instance) []*jetstream.Cluster {
	t.Helper()
	cs := make([]*jetstream.Cluster, len(insts))
	for i, inst := range insts {
		cl, err := jetstream.NewCluster(context.Background(), inst.Node, inst.NC, jetstream.ClusterOptions{
			Prefix:            inst.Broker.Prefix(),
			HeartbeatInterval: 200 * time.Millisecond,
			ExpireAfter:       time.Second,
			Timeout:           time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		cs[i] = cl
	}
	fabrictest.WaitFor(t, 5*time.Second, "every instance knows every other", func() bool {
		for _, cl := range cs {
			if cl.Members() != len(cs) {
				return false
			}
		}
		return true
	})
	return cs
}

// TestClusterCountsAndSendToUser: counts cover every instance; SendToUser
// reaches every tab of a user on any instance, in order, and nobody else;
// Unsubscribe and Disconnect reach every tab of a user, whichever instance
// is asked; a killed instance is reported as missing, then forgotten.
func TestClusterCountsAndSendToUser(t *testing.T) {
	insts := fabrictest.Cluster(t, 3, fabrictest.Options{Node: userNode()})
	cs := startClusters(t, insts)
	ctx := testCtx(t, 60*time.Second)

	alice0, alice2 := dialUser(insts[0], "alice"), dialUser(insts[2], "alice")
	bob := dialUser(insts[1], "bob")
	anon := dialUser(insts[1], "")
	for _, c := range []*wsclient.Client{alice0, alice2, bob} {
		if err := c.Subscribe(ctx, "room"); err != nil {
			t.Fatal(err)
		}
	}
	for i, cl := range cs {
		n, err := cl.Connections(ctx)
		if err != nil || n != 4 {
			t.Fatalf("instance %d: Connections = %d, %v; want 4", i, n, err)
		}
		s, err := cl.Subscribers(ctx, "room")
		if err != nil || s != 3 {
			t.Fatalf("instance %d: Subscribers(room) = %d, %v; want 3", i, s, err)
		}
	}

	const n = 200
	for i := range n {
		if err := cs[1].SendToUser(ctx, "alice", "dm", "msg", i); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*wsclient.Client{alice0, alice2} {
		for want := range n {
			e, err := c.Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var got int
			if e.Topic != "dm" || e.Event != "msg" || json.Unmarshal(e.Data, &got) != nil || got != want {
				t.Fatalf("alice got %+v, want message %d on dm", e, want)
			}
		}
	}
	for _, c := range []*wsclient.Client{bob, anon} {
		qctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		if e, err := c.Next(qctx); err == nil {
			t.Fatalf("a message for alice reached someone else: %+v", e)
		}
		cancel()
	}

	// alice leaves "room" on both of her instances, asked from the third.
	if n, err := cs[1].Unsubscribe(ctx, "alice", "room"); err != nil || n != 2 {
		t.Fatalf("Unsubscribe(alice, room) = %d, %v; want 2", n, err)
	}
	for i, cl := range cs {
		if s, err := cl.Subscribers(ctx, "room"); err != nil || s != 1 {
			t.Fatalf("instance %d: Subscribers(room) = %d, %v after the unsubscribe; want 1 (bob)", i, s, err)
		}
	}
	// alice is disconnected everywhere, asked from an instance she is not on.
	if n, err := cs[1].Disconnect(ctx, "alice", 4003, "kicked"); err != nil || n != 2 {
		t.Fatalf("Disconnect(alice) = %d, %v; want 2", n, err)
	}
	for i, c := range []*wsclient.Client{alice0, alice2} {
		fabrictest.WaitFor(t, 5*time.Second, "alice's close frame", func() bool {
			code, _ := c.CloseCode()
			return code != 0
		})
		if code, reason := c.CloseCode(); code != 4003 || reason != "kicked" {
			t.Fatalf("alice's tab %d closed with %d %q; want 4003 kicked", i, code, reason)
		}
	}
	if code, _ := bob.CloseCode(); code != 0 {
		t.Fatalf("bob was closed with %d", code)
	}
	fabrictest.WaitFor(t, 5*time.Second, "alice's connections gone", func() bool {
		n, err := cs[0].Connections(ctx)
		return err == nil && n == 2
	})

	// A killed instance: answers are partial (and say so) until it expires.
	insts[2].Kill()
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	n0, err := cs[0].Connections(short)
	cancel()
	if err == nil {
		// It may already have been forgotten if this machine is slow.
		t.Logf("no partial answer right after the kill (count %d)", n0)
	} else if !errors.Is(err, jetstream.ErrPartialCluster) || n0 != 2 {
		t.Fatalf("right after the kill: %d, %v; want 2 with ErrPartialCluster", n0, err)
	}
	short, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
	infos, err := cs[1].Info(short)
	cancel()
	if err != nil && !errors.Is(err, fabric.ErrPartialCluster) || len(infos) != 2 {
		t.Fatalf("Info right after the kill: %+v, %v; want the 2 live instances (with ErrPartialCluster unless already forgotten)", infos, err)
	}
	fabrictest.WaitFor(t, 5*time.Second, "the killed instance forgotten", func() bool {
		cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		n, err := cs[0].Connections(cctx)
		return err == nil && n == 2
	})
}

// TestClusterChannelsCutToMessageSize: when the instances' topic lists do
// not fit in one NATS message, each sends a prefix and the merge keeps only
// the topics every instance covered, so every count returned is complete.
func TestClusterChannelsCutToMessageSize(t *testing.T) {
	srv := fabrictest.StartNATS(t, func(o *server.Options) { o.MaxPayload = 8 << 10 })
	prefix := fabrictest.TestPrefix(t)
	ctx := testCtx(t, 60*time.Second)
	var cs []*jetstream.Cluster
	want := map[string]int{}
	for i := range 2 {
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		br := jetstream.NewBroker(nc, jetstream.BrokerOptions{Prefix: prefix})
		t.Cleanup(func() { br.Close() })
		node, err := fabric.NewNode(fabric.Config{Broker: br})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { node.Close() })
		c := node.Connect(discard{}, nil, "test")
		// Instance 0 has every topic of 0..399, instance 1 every other one
		// of 0..799: instance 0's list is the denser, so it is cut first.
		for k := 0; k < 400*(i+1); k += i + 1 {
			topic := fmt.Sprintf("channel:%04d", k)
			if err := node.Subscribe(c, topic); err != nil {
				t.Fatal(err)
			}
			want[topic]++
		}
		cl, err := jetstream.NewCluster(ctx, node, nc, jetstream.ClusterOptions{Prefix: prefix, HeartbeatInterval: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		cs = append(cs, cl)
	}
	fabrictest.WaitFor(t, 5*time.Second, "both instances know each other", func() bool {
		return cs[0].Members() == 2 && cs[1].Members() == 2
	})
	got, truncated, err := cs[1].Channels(ctx, "channel:*", fabric.MaxChannelsLimit)
	if err != nil || !truncated {
		t.Fatalf("Channels: %d topics, truncated %v, %v; want a truncated answer", len(got), truncated, err)
	}
	if len(got) == 0 || len(got) >= 400 {
		t.Fatalf("Channels returned %d topics; want a proper prefix", len(got))
	}
	t.Logf("the answer holds the first %d topics", len(got))
	last := ""
	for topic, n := range got {
		if n != want[topic] {
			t.Errorf("%s: %d subscribers, want %d", topic, n, want[topic])
		}
		last = max(last, topic)
	}
	for topic := range want {
		if _, ok := got[topic]; topic <= last && !ok {
			t.Errorf("%s is missing before the last topic returned (%s)", topic, last)
		}
	}
	// A limit below the cut: exactly limit topics, the first ones.
	got, truncated, err = cs[0].Channels(ctx, "", 5)
	if err != nil || !truncated || len(got) != 5 || got["channel:0000"] != 2 || got["channel:0004"] != 2 || got["channel:0003"] != 1 {
		t.Fatalf("Channels(limit 5) = %v, %v, %v", got, truncated, err)
	}
}
