package redis_test

// The benchmarks carry the names of jetstream's, so that one command
// measures both backends side by side (docs/benchmarks.md):
//
//	go test -run XXX -bench 'BenchmarkCrossInstance|BenchmarkPublish|BenchmarkResume|BenchmarkPresenceJoinLeave|BenchmarkConsume' ./jetstream/ ./redis/
//
// They use the shared test Redis (FABRIC_TEST_REDIS_URL, 127.0.0.1:6379 or
// a throwaway redis-server), each under its own prefix.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
)

// benchBackends connects n Backends sharing a fresh prefix (its keys are
// deleted at the end).
func benchBackends(b *testing.B, n int, o redis.Options) []*redis.Backend {
	b.Helper()
	url := needRedis(b)
	o.URL = url
	if o.Prefix == "" {
		o.Prefix = fabrictest.TestPrefix(b)
	}
	prefix := o.Prefix
	b.Cleanup(func() { dropPrefix(b, url, prefix, ":*") })
	out := make([]*redis.Backend, n)
	for i := range out {
		out[i] = newBackend(b, o)
	}
	return out
}

func benchNode(b *testing.B, rb *redis.Backend, persistent func(string) bool) *fabric.Node {
	b.Helper()
	n, err := fabric.NewNode(fabric.Config{Broker: rb.Broker(), History: rb.History(), Persistent: persistent})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close() })
	return n
}

// benchTransport counts deliveries.
type benchTransport struct{ got atomic.Int64 }

func (r *benchTransport) Deliver(*fabric.Message) bool { r.got.Add(1); return true }
func (r *benchTransport) Close(int, string)            {}

// BenchmarkCrossInstance measures publish on instance A → receipt by a
// subscriber on instance B (two Backends, each with its connections, on
// one Redis), with at most 20,000 messages in flight, one publishing
// goroutine (each publish waits for Redis's reply). Reports messages/s end
// to end.
func BenchmarkCrossInstance(b *testing.B) {
	const window = 20_000
	bs := benchBackends(b, 2, redis.Options{})
	na, nb := benchNode(b, bs[0], nil), benchNode(b, bs[1], nil)
	rt := &benchTransport{}
	if err := nb.Subscribe(nb.Connect(rt, nil, "bench"), "x"); err != nil {
		b.Fatal(err)
	}
	env := fabric.Envelope("x", "m", []byte(`"`+strings.Repeat("abcdefghij", 10)+`"`))
	ctx := context.Background()
	if _, err := na.PublishEnvelope(ctx, "x", env); err != nil {
		b.Fatal(err)
	}
	fabrictest.WaitFor(b, 10*time.Second, "the first message", func() bool { return rt.got.Load() == 1 })
	base := rt.got.Load()
	b.ResetTimer()
	deadline := time.Now().Add(60 * time.Second)
	wait := func(upTo int64) {
		for rt.got.Load()-base < upTo {
			if time.Now().After(deadline) {
				b.Fatalf("received %d of %d", rt.got.Load()-base, upTo)
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

// BenchmarkPublish compares a publish to a plain topic (one PUBLISH,
// awaited) with one to a persistent topic (the append script: stored,
// trimmed and published, acknowledged before Publish returns), from 64
// concurrent publishers per CPU (rueidis pipelines them).
func BenchmarkPublish(b *testing.B) {
	for _, persistent := range []bool{false, true} {
		name := "core"
		if persistent {
			name = "persistent"
		}
		b.Run(name, func(b *testing.B) {
			bs := benchBackends(b, 1, redis.Options{})
			n := benchNode(b, bs[0], func(t string) bool { return strings.HasPrefix(t, "p:") })
			topic := "plain"
			if persistent {
				topic = "p:bench"
			}
			env := fabric.Envelope(topic, "e", []byte(`{"text":"0123456789012345678901234567890123456789012345678901234567890123456789"}`))
			ctx := context.Background()
			b.SetParallelism(64)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := n.PublishEnvelope(ctx, topic, env); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

// BenchmarkResume measures the store's read of 200 missed messages of one
// topic, in a history holding 10,000 other topics (20 messages each) with
// the 200 spread among them, as jetstream's does. On Redis each topic has
// its own stream, so the other topics cost nothing to the read.
func BenchmarkResume(b *testing.B) {
	bs := benchBackends(b, 1, redis.Options{MaxPerTopic: 1000})
	h := bs[0].History()
	ctx := context.Background()
	const others, perOther, missed = 10000, 20, 200
	first, err := h.Append(ctx, "target", fabric.Envelope("target", "e", []byte(`-1`)), "")
	if err != nil {
		b.Fatal(err)
	}
	// Load the history fast: 1,024 concurrent appends (pipelined) at a time.
	every := others * perOther / missed
	var batch []string
	flush := func() {
		if len(batch) == 0 {
			return
		}
		bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		errs := make(chan error, len(batch))
		for _, topic := range batch {
			go func() {
				_, err := h.Append(bctx, topic, fabric.Envelope(topic, "e", []byte(`{"i":0}`)), "")
				errs <- err
			}()
		}
		for range batch {
			if err := <-errs; err != nil {
				b.Fatal(err)
			}
		}
		batch = batch[:0]
	}
	n := 0
	for range perOther {
		for t := range others {
			batch = append(batch, fmt.Sprintf("room:%d", t))
			if n++; n%every == 0 {
				flush() // the target's messages keep their order
				batch = append(batch, "target")
				flush()
			}
			if len(batch) >= 1024 {
				flush()
			}
		}
	}
	flush()
	b.Run("since", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			t0 := time.Now()
			rng, err := h.Since(ctx, "target", first.Seq, 0)
			lat = append(lat, time.Since(t0))
			if err != nil || len(rng.Messages) != missed || !rng.Complete {
				b.Fatalf("Since: %d messages, complete %v, %v", len(rng.Messages), rng.Complete, err)
			}
		}
		reportLatency(b, lat)
	})
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op")
}

// sink accepts and discards every message.
type sink struct{}

func (sink) Deliver(*fabric.Message) bool { return true }
func (sink) Close(int, string)            {}

// BenchmarkPresenceJoinLeave: Join then Leave through the API, each waiting
// for its write to be stored and seen by this instance's watcher.
func BenchmarkPresenceJoinLeave(b *testing.B) {
	bs := benchBackends(b, 1, redis.Options{})
	n := benchNode(b, bs[0], nil)
	ctx := context.Background()
	p, err := fabric.NewPresence(ctx, n, bs[0].PresenceStore(), fabric.PresenceOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = p.Close() })
	var next atomic.Int64
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		c := n.Connect(sink{}, fmt.Sprint("user-", next.Add(1)), "127.0.0.1:1")
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

// BenchmarkConsume: Consume on one instance for 10,000 distinct keys and
// for one hot key, with the default limit (30 per 10s: mostly refusals
// once warm) and with a limit that is never reached. Every decision is one
// script, one round trip (roundtrips/op is 1 by construction).
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
			bs := benchBackends(b, 1, redis.Options{})
			l := bs[0].RateLimiter(redis.RateLimitOptions{Points: tc.points, Interval: 10 * time.Second})
			keys := make([]string, tc.keys)
			for i := range keys {
				keys[i] = fmt.Sprint("user:", i)
			}
			ctx := context.Background()
			var allowed, next atomic.Int64
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
			b.ReportMetric(1, "roundtrips/op")
		})
	}
}
