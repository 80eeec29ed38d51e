package jetstream_test

import (
	"context"
	"fmt"
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

// countReceiver counts the messages a broker subscription delivers.
type countReceiver struct{ got atomic.Int64 }

func (r *countReceiver) Receive([]byte, uint64, uint64) { r.got.Add(1) }

// BenchmarkBrokerDelivery measures the broker's own path on one embedded
// server: publish on one connection → the server → the subscribing
// connection → the shard goroutine → Receive, over 1 or 64 topics
// published round-robin, with at most 20,000 messages in flight. Reports
// messages/s end to end.
func BenchmarkBrokerDelivery(b *testing.B) {
	for _, topics := range []int{1, 64} {
		b.Run(fmt.Sprintf("topics=%d", topics), func(b *testing.B) {
			const window = 20_000
			ns, err := embed.Start(context.Background(), embed.Options{DataDir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			sub, err := ns.Connect()
			if err != nil {
				b.Fatal(err)
			}
			pub, err := ns.Connect()
			if err != nil {
				b.Fatal(err)
			}
			br := jetstream.NewBroker(sub, jetstream.BrokerOptions{Prefix: "bench"})
			b.Cleanup(func() { br.Close(); pub.Close(); sub.Close(); ns.Shutdown() })
			r := &countReceiver{}
			subjects := make([]string, topics)
			for i := range subjects {
				topic := fmt.Sprintf("t%d", i)
				subjects[i] = jetstream.Subject("bench", topic)
				if _, err := br.Subscribe(topic, r); err != nil {
					b.Fatal(err)
				}
			}
			if err := sub.Flush(); err != nil {
				b.Fatal(err)
			}
			env := fabric.Envelope("t", "m", []byte(`"`+strings.Repeat("abcdefghij", 10)+`"`))
			deadline := time.Now().Add(60 * time.Second)
			wait := func(upTo int64) {
				for r.got.Load() < upTo {
					if time.Now().After(deadline) {
						b.Fatalf("received %d of %d (dropped %d)", r.got.Load(), upTo, br.Dropped())
					}
					time.Sleep(20 * time.Microsecond)
				}
			}
			b.ResetTimer()
			for i := range b.N {
				if i >= window {
					wait(int64(i - window))
				}
				if err := pub.Publish(subjects[i%topics], env); err != nil {
					b.Fatal(err)
				}
			}
			wait(int64(b.N))
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
