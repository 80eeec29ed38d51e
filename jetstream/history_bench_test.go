package jetstream_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// BenchmarkPublish compares a publish to a plain topic (core NATS, not
// awaited) with one to a persistent topic (stored in the history stream and
// acknowledged before Publish returns; file storage, R1, embedded server),
// from 64 concurrent publishers per CPU.
func BenchmarkPublish(b *testing.B) {
	for _, persistent := range []bool{false, true} {
		name := "core"
		if persistent {
			name = "persistent"
		}
		b.Run(name, func(b *testing.B) {
			inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, jetstream.HistoryOptions{Eager: true}, "p:*"))
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
					if _, err := inst.Node.PublishEnvelope(ctx, topic, env); err != nil {
						b.Error(err)
						return
					}
				}
			})
			if !persistent {
				_ = inst.NC.Flush()
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

// BenchmarkResume measures a resume that misses 200 messages of one topic,
// in a history holding 10,000 other topics (20 messages each, spread over
// the default partitions) with the 200 spread among them (the worst case
// for a filtered read): the store's Since,
// and whole replays over a WebSocket (request to "end") on an instance that
// has the topic's recent messages in its cache (a subscriber was there) and
// on one that must read the store.
func BenchmarkResume(b *testing.B) {
	addr := fabrictest.FreeAddr(b)
	hopts := jetstream.HistoryOptions{Eager: true, MaxPerTopic: 1000}
	// One connection replays back to back: lift its resume rate limit.
	unlimited := fabric.ResumeLimits{Rate: 1e9, Burst: 1 << 30}
	inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{Embed: embed.Options{ClientListen: addr},
		Node: fabric.Config{ResumeLimits: unlimited}}, hopts, "*"))
	cold := fabrictest.NewInstance(b, withHistory(fabrictest.Options{NATSURL: "nats://" + addr, Prefix: inst.Broker.Prefix(),
		Node: fabric.Config{ReplayCache: -1, ResumeLimits: unlimited}}, hopts, "*"))
	const others, perOther, missed = 10000, 20, 200
	ctx := context.Background()
	live := inst.Dial(wsclient.Options{Buffer: 1024})
	if err := live.Subscribe(ctx, "target"); err != nil {
		b.Fatal(err)
	}
	js := inst.JS
	hist := inst.Node.History().(*jetstream.History)
	var since uint64
	publish := func(topic string, i int) {
		_, err := js.PublishAsync(hist.SubjectOf(topic), fabric.Envelope(topic, "e", fmt.Appendf(nil, `{"i":%d}`, i)))
		if err != nil {
			b.Fatal(err)
		}
	}
	// The target's first message is the resume point; its other 200 are
	// spread evenly over the 200,000 messages of the other topics.
	seq, err := inst.Node.Publish(ctx, "target", "e", -1)
	if err != nil {
		b.Fatal(err)
	}
	since = seq
	every := others * perOther / missed
	n := 0
	for r := range perOther {
		for t := range others {
			publish(fmt.Sprintf("room:%d", t), r)
			if n++; n%every == 0 {
				publish("target", n/every)
			}
			if n%4096 == 0 {
				<-js.PublishAsyncComplete()
			}
		}
	}
	<-js.PublishAsyncComplete()
	for range missed + 1 { // the live subscriber saw them all
		if _, err := live.Next(ctx); err != nil {
			b.Fatal(err)
		}
	}
	h := inst.Node.History()

	b.Run("since", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			t0 := time.Now()
			rng, err := h.Since(ctx, "target", since, 0)
			lat = append(lat, time.Since(t0))
			if err != nil || len(rng.Messages) != missed || !rng.Complete {
				b.Fatalf("Since: %d messages, complete %v, %v", len(rng.Messages), rng.Complete, err)
			}
		}
		reportLatency(b, lat)
	})
	for _, in := range []struct {
		name string
		inst *fabrictest.Instance
	}{{"websocket-cache", inst}, {"websocket-store", cold}} {
		b.Run(in.name, func(b *testing.B) {
			c := in.inst.Dial(wsclient.Options{Buffer: 1024})
			lat := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t0 := time.Now()
				if err := c.Replay("target", since); err != nil {
					b.Fatal(err)
				}
				got := 0
				for {
					ev, err := c.Next(ctx)
					if err != nil {
						b.Fatal(err)
					}
					if ev.Event == "end" {
						break
					}
					got++
				}
				lat = append(lat, time.Since(t0))
				if got != missed {
					b.Fatalf("replayed %d, want %d", got, missed)
				}
			}
			reportLatency(b, lat)
		})
	}
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op")
}
