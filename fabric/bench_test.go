package fabric

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
)

// ringTransport stands in for a connection's outbound queue: a mutex and a
// fixed ring of message pointers, the same work a WebSocket connection does
// on Deliver before its flusher writes.
type ringTransport struct {
	mu   sync.Mutex
	ring [64]*Message
	n    int
	got  atomic.Int64
}

func (r *ringTransport) Deliver(m *Message) bool {
	r.mu.Lock()
	r.ring[r.n%len(r.ring)] = m
	r.n++
	r.mu.Unlock()
	r.got.Add(1)
	return true
}

func (r *ringTransport) Close(int, string) {}

func benchNode(b *testing.B, o embed.Options) (*Node, *embed.Server) {
	b.Helper()
	if o.DataDir == "" {
		o.DataDir = b.TempDir()
	}
	ns, err := embed.Start(context.Background(), o)
	if err != nil {
		b.Fatal(err)
	}
	nc, err := ns.Connect()
	if err != nil {
		b.Fatal(err)
	}
	br := NewNATSBroker(nc, NATSBrokerOptions{Prefix: "bench"})
	n, err := NewNode(Config{Broker: br})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close(); br.Close(); nc.Close(); ns.Shutdown() })
	return n, ns
}

// BenchmarkFanout measures the per-instance fan-out of one arriving message
// to 1,000 local subscribers: the envelope is framed once, then the same
// frame is queued to each subscriber. Reports ns and allocations per
// delivery (one op = one message = 1,000 deliveries).
func BenchmarkFanout(b *testing.B) {
	for _, subs := range []int{1_000, 10_000} {
		b.Run(fmt.Sprintf("subscribers=%d", subs), func(b *testing.B) {
			n, _ := benchNode(b, embed.Options{})
			for range subs {
				c := n.Connect(&ringTransport{}, nil, "bench")
				if err := n.Subscribe(c, "room"); err != nil {
					b.Fatal(err)
				}
			}
			s := n.hub.shard("room")
			s.mu.Lock()
			t := s.topics["room"]
			s.mu.Unlock()
			env := Envelope("room", "msg", []byte(`{"text":"`+string(make128())+`"}`))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				t.Receive(env, 0, 0)
			}
			b.StopTimer()
			d := float64(b.N) * float64(subs)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/d, "ns/delivery")
			b.ReportMetric(d/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}

func make128() []byte {
	p := make([]byte, 100)
	for i := range p {
		p[i] = 'a' + byte(i%26)
	}
	return p
}

// BenchmarkCrossInstance measures publish on instance A → receipt by a
// subscriber on instance B, two embedded servers clustered by routes, with at
// most 20,000 messages in flight (core NATS has no end-to-end flow control:
// a publisher that outruns the receiving instance without bound gets it cut
// off as a slow consumer). Reports messages/s end to end.
func BenchmarkCrossInstance(b *testing.B) {
	const window = 20_000
	a1, a2 := freeAddr(b), freeAddr(b)
	routes := []string{"nats://" + a1, "nats://" + a2}
	na, _ := benchNode(b, embed.Options{Name: "bench-a", ClusterListen: a1, Routes: routes})
	nb, sb := benchNode(b, embed.Options{Name: "bench-b", ClusterListen: a2, Routes: routes})
	for sb.NATS().NumRoutes() == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	rt := &ringTransport{}
	if err := nb.Subscribe(nb.Connect(rt, nil, "bench"), "x"); err != nil {
		b.Fatal(err)
	}
	env := Envelope("x", "m", []byte(`"`+string(make128())+`"`))
	ctx := context.Background()
	// Wait for interest to cross the route.
	for rt.got.Load() == 0 {
		_, _ = na.PublishEnvelope(ctx, "x", env)
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	base := rt.got.Load()
	b.ResetTimer()
	deadline := time.Now().Add(60 * time.Second)
	wait := func(upTo int64) {
		for rt.got.Load()-base < upTo {
			if time.Now().After(deadline) {
				v, _ := sb.NATS().Varz(nil)
				b.Fatalf("received %d of %d (slow consumers on B: %d)", rt.got.Load()-base, upTo, v.SlowConsumers)
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	for i := range b.N {
		if i >= window {
			wait(int64(i - window))
		}
		if _, err := na.PublishEnvelope(ctx, "x", env); err != nil {
			b.Fatal(err)
		}
	}
	wait(int64(b.N))
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
