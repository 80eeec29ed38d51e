package jetstream_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
)

// sink is a transport that accepts and discards every message: benchmarks
// measure presence and rate limiting, not WebSocket writes.
type sink struct{}

func (sink) Deliver(*fabric.Message) bool { return true }
func (sink) Close(int, string)            {}

func benchPresence(b *testing.B, opts fabric.PresenceOptions) (*fabrictest.Instance, *fabric.Presence) {
	inst := fabrictest.NewInstance(b, fabrictest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := jetstream.NewPresenceStore(ctx, inst.JS, jetstream.PresenceStoreOptions{Prefix: inst.Broker.Prefix()})
	if err != nil {
		b.Fatal(err)
	}
	p, err := fabric.NewPresence(ctx, inst.Node, store, opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close(); store.Close() })
	return inst, p
}

// BenchmarkPresenceJoinLeave: Join then Leave through the API, each waiting
// for its write to be acknowledged and seen by this instance's watcher.
func BenchmarkPresenceJoinLeave(b *testing.B) {
	inst, p := benchPresence(b, fabric.PresenceOptions{})
	ctx := context.Background()
	var next atomic.Int64
	b.SetParallelism(8) // 8 goroutines per CPU: the calls wait on round trips
	b.RunParallel(func(pb *testing.PB) {
		c := inst.Node.Connect(sink{}, fmt.Sprint("user-", next.Add(1)), "127.0.0.1:1")
		for pb.Next() {
			if err := p.Join(ctx, "room:bench", c); err != nil {
				b.Error(err)
				return
			}
			if err := p.Leave(ctx, "room:bench", c); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "join+leave/s")
}

// BenchmarkPresenceSubscribeUnsubscribe: the automatic path, a subscribe
// and an unsubscribe of a presence topic (writes not awaited), until every
// write is acknowledged.
func BenchmarkPresenceSubscribeUnsubscribe(b *testing.B) {
	inst, _ := benchPresence(b, fabric.PresenceOptions{Topics: fabric.MatchTopics([]string{"room:*"})})
	var next atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		c := inst.Node.Connect(sink{}, fmt.Sprint("user-", next.Add(1)), "127.0.0.1:1")
		for pb.Next() {
			if err := inst.Node.Subscribe(c, "room:bench"); err != nil {
				b.Error(err)
				return
			}
			inst.Node.Unsubscribe(c, "room:bench")
		}
	})
	select {
	case <-inst.JS.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		b.Fatal("writes not acknowledged")
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "join+leave/s")
}

// BenchmarkPresenceList10k: List of a topic with 10,000 members.
func BenchmarkPresenceList10k(b *testing.B) {
	inst, p := benchPresence(b, fabric.PresenceOptions{Topics: fabric.MatchTopics([]string{"room:*"}), Select: func(ud any) any { return map[string]any{"name": ud} }})
	const members = 10_000
	for i := range members {
		c := inst.Node.Connect(sink{}, fmt.Sprint("user-", i), "127.0.0.1:1")
		if err := inst.Node.Subscribe(c, "room:big"); err != nil {
			b.Fatal(err)
		}
	}
	ctx := context.Background()
	fabrictest.WaitFor(b, 60*time.Second, "10,000 members", func() bool {
		n, _ := p.Count(ctx, "room:big")
		return n == members
	})
	b.ResetTimer()
	for b.Loop() {
		list, err := p.List(ctx, "room:big")
		if err != nil || len(list) != members {
			b.Fatalf("List: %d members, %v", len(list), err)
		}
	}
}

// BenchmarkPresenceListSubscribe10k: a subscribe to __presence:T for a
// topic with 10,000 members, which encodes and sends the list.
func BenchmarkPresenceListSubscribe10k(b *testing.B) {
	inst, p := benchPresence(b, fabric.PresenceOptions{Topics: fabric.MatchTopics([]string{"room:*"}), Select: func(ud any) any { return map[string]any{"name": ud} }})
	const members = 10_000
	for i := range members {
		c := inst.Node.Connect(sink{}, fmt.Sprint("user-", i), "127.0.0.1:1")
		if err := inst.Node.Subscribe(c, "room:big"); err != nil {
			b.Fatal(err)
		}
	}
	ctx := context.Background()
	fabrictest.WaitFor(b, 60*time.Second, "10,000 members", func() bool {
		n, _ := p.Count(ctx, "room:big")
		return n == members
	})
	obs := inst.Node.Connect(sink{}, nil, "127.0.0.1:1")
	b.ResetTimer()
	for b.Loop() {
		if err := inst.Node.Subscribe(obs, "__presence:room:big"); err != nil {
			b.Fatal(err)
		}
		inst.Node.Unsubscribe(obs, "__presence:room:big")
	}
}

func benchLimiter(b *testing.B, opts jetstream.RateLimitOptions) *jetstream.RateLimiter {
	inst := fabrictest.NewInstance(b, fabrictest.Options{})
	opts.Prefix = inst.Broker.Prefix()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := jetstream.NewRateLimiter(ctx, inst.JS, opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	return l
}

func benchConsume(b *testing.B, l *jetstream.RateLimiter, keys []string) {
	ctx := context.Background()
	var allowed atomic.Int64
	var next atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1)) * 7919
		n := int64(0)
		for pb.Next() {
			ok, _, _, err := l.Consume(ctx, keys[i%len(keys)], 1)
			if err != nil {
				b.Error(err)
				return
			}
			if ok {
				n++
			}
			i++
		}
		allowed.Add(n)
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "consume/s")
	b.ReportMetric(float64(allowed.Load())/float64(b.N), "allowed/op")
	b.ReportMetric(float64(l.Leases())/float64(b.N), "roundtrips/op")
}

func keyList(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprint("user:", i)
	}
	return keys
}

// BenchmarkConsume: Consume on one instance for 10,000 distinct keys and
// for one hot key, with the default limit (30 per 10s: mostly refusals once
// warm) and with a limit that is never reached (every call admitted).
func BenchmarkConsume(b *testing.B) {
	for _, tc := range []struct {
		name   string
		keys   int
		points int
	}{
		{"keys=10000/points=30", 10_000, 30},
		{"keys=10000/points=1e9", 10_000, 1e9},
		{"keys=1/points=30", 1, 30},
		{"keys=1/points=1e9", 1, 1e9},
	} {
		b.Run(tc.name, func(b *testing.B) {
			l := benchLimiter(b, jetstream.RateLimitOptions{Points: tc.points, Interval: 10 * time.Second})
			benchConsume(b, l, keyList(tc.keys))
		})
	}
}

func benchClusters(b *testing.B, n int) ([]*fabrictest.Instance, []*jetstream.Cluster) {
	insts := fabrictest.Cluster(b, n, fabrictest.Options{})
	cs := make([]*jetstream.Cluster, n)
	for i, inst := range insts {
		cl, err := jetstream.NewCluster(context.Background(), inst.Node, inst.NC, jetstream.ClusterOptions{Prefix: inst.Broker.Prefix()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cl.Close() })
		cs[i] = cl
	}
	fabrictest.WaitFor(b, 10*time.Second, "membership", func() bool {
		for _, cl := range cs {
			if cl.Members() != n {
				return false
			}
		}
		return true
	})
	return insts, cs
}

// BenchmarkClusterConnections: one cluster-wide count over three
// route-clustered instances (a scatter-gather round).
func BenchmarkClusterConnections(b *testing.B) {
	_, cs := benchClusters(b, 3)
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if _, err := cs[0].Connections(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSendToUser: SendToUser from one instance to a user with a
// connection on each of the other two, until both have received them all.
func BenchmarkSendToUser(b *testing.B) {
	insts, cs := benchClusters(b, 3)
	var got atomic.Int64
	counter := countingTransport{n: &got}
	for _, inst := range insts[1:] {
		inst.Node.Connect(counter, "alice", "127.0.0.1:1")
	}
	// Wait until the user's subscriptions have reached the sender's server.
	ctx := context.Background()
	fabrictest.WaitFor(b, 10*time.Second, "user interest", func() bool {
		before := got.Load()
		_ = cs[0].SendToUser(ctx, "alice", "dm", "probe", nil)
		time.Sleep(20 * time.Millisecond)
		return got.Load() >= before+2
	})
	time.Sleep(50 * time.Millisecond)
	got.Store(0)
	// At most window messages in flight: core NATS drops what a slow
	// receiver cannot take, so an unpaced loop would measure drops.
	const window = 4096
	b.ResetTimer()
	sent := int64(0)
	for b.Loop() {
		if err := cs[0].SendToUser(ctx, "alice", "dm", "msg", 1); err != nil {
			b.Fatal(err)
		}
		sent++
		for 2*sent-got.Load() > 2*window {
			time.Sleep(50 * time.Microsecond)
		}
	}
	fabrictest.WaitFor(b, 30*time.Second, "deliveries", func() bool { return got.Load() >= 2*sent })
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sends/s")
}

type countingTransport struct{ n *atomic.Int64 }

func (t countingTransport) Deliver(*fabric.Message) bool { t.n.Add(1); return true }
func (countingTransport) Close(int, string)              {}

// BenchmarkConsumeColdKey: every call on a key never seen, so every call is
// a lease round trip: the price of the slow path, on one instance (R1) and
// on a three-instance cluster with a replicated counter stream (R3).
func BenchmarkConsumeColdKey(b *testing.B) {
	run := func(b *testing.B, l *jetstream.RateLimiter) {
		ctx := context.Background()
		var next atomic.Int64
		b.SetParallelism(8)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if ok, _, _, err := l.Consume(ctx, fmt.Sprint("cold:", next.Add(1)), 1); !ok || err != nil {
					b.Errorf("refused: %v", err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "consume/s")
		b.ReportMetric(float64(l.Leases())/float64(b.N), "roundtrips/op")
	}
	b.Run("R1", func(b *testing.B) {
		run(b, benchLimiter(b, jetstream.RateLimitOptions{Points: 30}))
	})
	b.Run("R3", func(b *testing.B) {
		insts := fabrictest.Cluster(b, 3, fabrictest.Options{})
		ls := make([]*jetstream.RateLimiter, 3)
		for i, inst := range insts {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			l, err := jetstream.NewRateLimiter(ctx, inst.JS, jetstream.RateLimitOptions{Prefix: inst.Broker.Prefix(), Points: 30, Replicas: 3})
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { l.Close() })
			ls[i] = l
		}
		run(b, ls[0])
	})
}
