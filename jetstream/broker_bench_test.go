package jetstream_test

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/jetstream"
)

// benchTransport counts deliveries, the work of a connection's Deliver
// without its socket.
type benchTransport struct{ got atomic.Int64 }

func (r *benchTransport) Deliver(*fabric.Message) bool { r.got.Add(1); return true }
func (r *benchTransport) Close(int, string)            {}

func benchNode(b *testing.B, o embed.Options) (*fabric.Node, *embed.Server) {
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
	br := jetstream.NewBroker(nc, jetstream.BrokerOptions{Prefix: "bench"})
	n, err := fabric.NewNode(fabric.Config{Broker: br})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close(); br.Close(); nc.Close(); ns.Shutdown() })
	return n, ns
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
	rt := &benchTransport{}
	if err := nb.Subscribe(nb.Connect(rt, nil, "bench"), "x"); err != nil {
		b.Fatal(err)
	}
	env := fabric.Envelope("x", "m", []byte(`"`+strings.Repeat("abcdefghij", 10)+`"`))
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
