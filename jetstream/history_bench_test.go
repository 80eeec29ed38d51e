package jetstream_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats.go"
	natsjs "github.com/nats-io/nats.go/jetstream"
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
			benchPublish(b, []*fabrictest.Instance{inst}, []string{topic}, 64)
		})
	}
}

// BenchmarkPersistentPublish measures acknowledged persistent publishes
// through Node.Publish (History.Append, pipelined) in the configurations
// docs/benchmarks.md reports, 64 publishers per CPU unless the name says
// otherwise:
//
//   - one-topic: every publish to one topic (one partition stream), R1,
//     file storage, the store's default fsync (every 2 minutes);
//   - topics=1000: 1,000 topics over the default 16 partitions;
//   - sync-always: one-topic with every write fsynced before its ack;
//   - R3: one-topic on three routed embedded instances in this process,
//     publishing on all three (the stream replicated three ways);
//   - publishers=1: one publisher, one publish at a time (no pipelining
//     possible: each waits for its ack).
func BenchmarkPersistentPublish(b *testing.B) {
	hopts := jetstream.HistoryOptions{Eager: true}
	topics := make([]string, 1000)
	for i := range topics {
		topics[i] = fmt.Sprintf("p:room-%d", i)
	}
	b.Run("one-topic", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, hopts, "p:*"))
		benchPublish(b, []*fabrictest.Instance{inst}, []string{"p:bench"}, 64)
	})
	b.Run("topics=1000", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, hopts, "p:*"))
		benchPublish(b, []*fabrictest.Instance{inst}, topics, 64)
	})
	b.Run("sync-always", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{Embed: embed.Options{SyncAlways: true}}, hopts, "p:*"))
		benchPublish(b, []*fabrictest.Instance{inst}, []string{"p:bench"}, 64)
	})
	b.Run("R3", func(b *testing.B) {
		r3 := hopts
		r3.Replicas = 3
		insts := fabrictest.Cluster(b, 3, withHistory(fabrictest.Options{}, r3, "p:*"))
		benchPublish(b, insts, []string{"p:bench"}, 64)
	})
	b.Run("publishers=1", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, hopts, "p:*"))
		benchPublish(b, []*fabrictest.Instance{inst}, []string{"p:bench"}, 0)
	})
	// The same stores without Fabric's Node: History.Append alone, and the
	// ceiling, nats.go's own asynchronous JetStream publish (a message id
	// each, the same waiters), which no client-side pipeline can beat.
	b.Run("append-only", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, hopts, "p:*"))
		h := inst.Node.History().(*jetstream.History)
		env := fabric.Envelope("p:bench", "e", benchData)
		benchParallel(b, 64, func(g, i int) error {
			_, err := h.Append(context.Background(), "p:bench", env, "")
			return err
		})
	})
	b.Run("nats.go-async-ceiling", func(b *testing.B) {
		inst := fabrictest.NewInstance(b, withHistory(fabrictest.Options{}, hopts, "p:*"))
		h := inst.Node.History().(*jetstream.History)
		subj := h.SubjectOf("p:bench")
		env := fabric.Envelope("p:bench", "e", benchData)
		var ids atomic.Uint64
		benchParallel(b, 64, func(g, i int) error {
			f, err := inst.JS.PublishMsgAsync(&nats.Msg{Subject: subj, Data: env,
				Header: nats.Header{nats.MsgIdHdr: []string{strconv.FormatUint(ids.Add(1), 36)}}})
			if err != nil {
				return err
			}
			select {
			case <-f.Ok():
				return nil
			case err := <-f.Err():
				return err
			}
		})
	})
	// The server's own bound on this machine: the same async publishes
	// to a bare R1 file stream (no RePublish, no message ids, no
	// per-subject limit), which Fabric's history cannot be faster than,
	// then with each of the history stream's features alone.
	for _, v := range []struct {
		name              string
		msgID, republish  bool
		maxMsgsPerSubject int64
	}{
		{name: "bare-stream"},
		{name: "bare+msg-id", msgID: true},
		{name: "bare+republish", republish: true},
		{name: "bare+max-per-subject", maxMsgsPerSubject: 1000},
	} {
		b.Run("nats.go-async-"+v.name, func(b *testing.B) {
			inst := fabrictest.NewInstance(b, fabrictest.Options{})
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			subj := inst.Broker.Prefix() + ".bare.x"
			cfg := natsjs.StreamConfig{Name: "bench_bare", Subjects: []string{inst.Broker.Prefix() + ".bare.*"},
				Storage: natsjs.FileStorage, MaxMsgsPerSubject: v.maxMsgsPerSubject}
			if v.republish {
				cfg.RePublish = &natsjs.RePublish{Source: inst.Broker.Prefix() + ".bare.*", Destination: inst.Broker.Prefix() + ".live.{{wildcard(1)}}"}
			}
			if _, err := inst.JS.CreateStream(ctx, cfg); err != nil {
				b.Fatal(err)
			}
			env := fabric.Envelope("p:bench", "e", benchData)
			var ids atomic.Uint64
			benchParallel(b, 64, func(g, i int) error {
				m := &nats.Msg{Subject: subj, Data: env}
				if v.msgID {
					m.Header = nats.Header{nats.MsgIdHdr: []string{strconv.FormatUint(ids.Add(1), 36)}}
				}
				f, err := inst.JS.PublishMsgAsync(m)
				if err != nil {
					return err
				}
				select {
				case <-f.Ok():
					return nil
				case err := <-f.Err():
					return err
				}
			})
		})
	}
}

var benchData = []byte(`{"text":"0123456789012345678901234567890123456789012345678901234567890123456789"}`)

// benchParallel runs publish from parallelism goroutines per CPU and
// reports msgs/s.
func benchParallel(b *testing.B, parallelism int, publish func(g, i int) error) {
	b.ReportAllocs()
	var next atomic.Int64
	b.SetParallelism(parallelism)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		g := int(next.Add(1))
		for i := 0; pb.Next(); i++ {
			if err := publish(g, i); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// benchPublish publishes a 100-byte message from parallelism goroutines per
// CPU (0: one goroutine in all), spread round robin over insts and topics,
// and reports msgs/s.
func benchPublish(b *testing.B, insts []*fabrictest.Instance, topics []string, parallelism int) {
	envs := make([][]byte, len(topics))
	for i, t := range topics {
		envs[i] = fabric.Envelope(t, "e", benchData)
	}
	ctx := context.Background()
	publish := func(g, i int) error {
		k := (g + i) % len(topics)
		_, err := insts[g%len(insts)].Node.PublishEnvelope(ctx, topics[k], envs[k])
		return err
	}
	// Every stream ready on every instance before the clock starts (an R3
	// stream on a loaded machine can take longer than one attempt's 5 s).
	wctx, cancel := context.WithTimeout(ctx, 120*time.Second)
	defer cancel()
	for _, in := range insts {
		for k, t := range topics {
			for {
				_, err := in.Node.PublishEnvelope(wctx, t, envs[k])
				if err == nil {
					break
				}
				if wctx.Err() != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	if parallelism == 0 {
		i := 0
		for b.Loop() {
			if err := publish(0, i); err != nil {
				b.Fatal(err)
			}
			i++
		}
	} else {
		var next atomic.Int64
		b.SetParallelism(parallelism)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			g := int(next.Add(1))
			for i := 0; pb.Next(); i++ {
				if err := publish(g, i); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	for _, in := range insts {
		_ = in.NC.Flush()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
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

// Tests of the pipelined Append (history_async.go). They live here, with
// the benchmarks of the same path.

// newTestHistory is a History of its own on inst's connection.
func newTestHistory(t *testing.T, inst *fabrictest.Instance, o jetstream.HistoryOptions) *jetstream.History {
	t.Helper()
	o.Prefix = inst.Broker.Prefix()
	o.Eager = true
	h, err := jetstream.NewHistory(testCtx(t, 60*time.Second), inst.JS, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// TestAppendPipelined: 64 goroutines append to 8 topics at once through a
// window of 16; every Append gets its own sequence, one goroutine's
// appends of one topic get increasing ones, a repeated message id returns
// the first append's position without storing again, and the store holds
// exactly what was acknowledged, in sequence order.
func TestAppendPipelined(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	h := newTestHistory(t, inst, jetstream.HistoryOptions{MaxPerTopic: 10_000, MaxInFlight: 16})
	ctx := testCtx(t, 120*time.Second)
	const goroutines, each, topics = 64, 40, 8
	type stored struct {
		seq uint64
		env string
	}
	var mu sync.Mutex
	got := map[string][]stored{}
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			last := map[string]uint64{}
			for i := range each {
				topic := fmt.Sprintf("pipe:%d", (g+i)%topics)
				env := fabric.Envelope(topic, "n", fmt.Appendf(nil, `{"g":%d,"i":%d}`, g, i))
				id := fmt.Sprintf("g%d-i%d", g, i)
				pos, err := h.Append(ctx, topic, env, id)
				if err != nil {
					t.Errorf("append %s: %v", id, err)
					return
				}
				if pos.Seq <= last[topic] {
					t.Errorf("goroutine %d, %s: seq %d after %d", g, topic, pos.Seq, last[topic])
				}
				last[topic] = pos.Seq
				if i%10 == 0 { // a retry of the same message: its first position, stored once
					again, err := h.Append(ctx, topic, env, id)
					if err != nil || again.Seq != pos.Seq {
						t.Errorf("retry of %s: %v, %v; want seq %d", id, again, err, pos.Seq)
					}
				}
				mu.Lock()
				got[topic] = append(got[topic], stored{pos.Seq, string(env)})
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if n := h.AppendsInFlight(); n != 0 {
		t.Errorf("%d appends still in flight", n)
	}
	total := 0
	for topic, want := range got {
		slices.SortFunc(want, func(a, b stored) int { return int(a.seq) - int(b.seq) })
		rng, err := h.Since(ctx, topic, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(rng.Messages) != len(want) {
			t.Fatalf("%s holds %d messages, %d were acknowledged", topic, len(rng.Messages), len(want))
		}
		for i, m := range rng.Messages {
			if m.Seq != want[i].seq || string(m.Envelope) != want[i].env {
				t.Fatalf("%s message %d: %d %s, want %d %s", topic, i, m.Seq, m.Envelope, want[i].seq, want[i].env)
			}
		}
		total += len(want)
	}
	if total != goroutines*each {
		t.Fatalf("%d appends acknowledged, want %d", total, goroutines*each)
	}
}

// TestAppendCloseInFlight: Close while appends wait for their acks: every
// append still succeeds (the ones caught in flight go on without the
// pipeline, with the same id) and each message is stored once.
func TestAppendCloseInFlight(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	h := newTestHistory(t, inst, jetstream.HistoryOptions{MaxPerTopic: 10_000})
	ctx := testCtx(t, 120*time.Second)
	const goroutines, each = 32, 50
	var wg sync.WaitGroup
	var acked atomic.Int64
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				if g == 0 && i == each/2 {
					if err := h.Close(); err != nil {
						t.Error(err)
					}
				}
				env := fabric.Envelope("close:1", "n", fmt.Appendf(nil, `{"g":%d,"i":%d}`, g, i))
				if _, err := h.Append(ctx, "close:1", env, ""); err != nil {
					t.Errorf("append: %v", err)
					return
				}
				acked.Add(1)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// The History's reads are closed: read with another one.
	r := newTestHistory(t, inst, jetstream.HistoryOptions{MaxPerTopic: 10_000})
	rng, err := r.Since(ctx, "close:1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rng.Messages) != int(acked.Load()) {
		t.Fatalf("%d messages stored, %d acknowledged", len(rng.Messages), acked.Load())
	}
	seen := map[string]bool{}
	for _, m := range rng.Messages {
		if seen[string(m.Envelope)] {
			t.Fatalf("stored twice: %s", m.Envelope)
		}
		seen[string(m.Envelope)] = true
	}
}

// TestAppendAbandoned: appends whose context ends before their ack leave
// nothing registered, their late acks reach no other append, and the
// pipeline goes on serving.
func TestAppendAbandoned(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	h := newTestHistory(t, inst, jetstream.HistoryOptions{MaxPerTopic: 10_000, MaxInFlight: 8})
	ctx := testCtx(t, 120*time.Second)
	var wg sync.WaitGroup
	for g := range 64 {
		wg.Go(func() {
			for i := range 20 {
				actx, cancel := context.WithTimeout(ctx, time.Duration((g*20+i)%300)*time.Microsecond)
				_, err := h.Append(actx, "gone:1", fabric.Envelope("gone:1", "n", []byte("1")), "")
				cancel()
				if err != nil && !errors.Is(err, fabric.ErrBackendUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("abandoned append: %v", err)
				}
			}
		})
	}
	wg.Wait()
	fabrictest.WaitFor(t, 10*time.Second, "no append in flight", func() bool { return h.AppendsInFlight() == 0 })
	last := uint64(0)
	for i := range 100 {
		pos, err := h.Append(ctx, "gone:2", fabric.Envelope("gone:2", "n", fmt.Appendf(nil, "%d", i)), "")
		if err != nil {
			t.Fatal(err)
		}
		if pos.Seq <= last {
			t.Fatalf("seq %d after %d", pos.Seq, last)
		}
		last = pos.Seq
	}
	rng, err := h.Since(ctx, "gone:2", 0, 0)
	if err != nil || len(rng.Messages) != 100 {
		t.Fatalf("gone:2 holds %d messages (%v), want 100", len(rng.Messages), err)
	}
	for i, m := range rng.Messages {
		if want := fabric.Envelope("gone:2", "n", fmt.Appendf(nil, "%d", i)); string(m.Envelope) != string(want) {
			t.Fatalf("message %d is %s, want %s", i, m.Envelope, want)
		}
	}
}
