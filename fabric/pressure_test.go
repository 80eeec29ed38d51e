package fabric

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// manualNode returns a node whose sampler never ticks by itself (the test
// drives samplePressure with its own clock) and its first sample's time.
func manualNode(t *testing.T, o PressureOptions) (*Node, time.Time) {
	t.Helper()
	o.SampleInterval = MaxPressureSampleInterval // the test drives samplePressure itself
	n, err := NewNode(Config{Broker: nopBroker{}, Pressure: o})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n, n.Pressure().SampledAt
}

func publishN(t *testing.T, n *Node, topic string, count int) {
	t.Helper()
	env := Envelope(topic, "e", []byte(`{"x":1}`))
	for range count {
		if _, err := n.PublishEnvelope(context.Background(), topic, env); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPressurePublishRate: PUBLISH_RATE turns on at the threshold, stays on
// inside the hysteresis band, and turns off after ClearAfter samples under
// it; TopPublishers is sorted and capped.
func TestPressurePublishRate(t *testing.T) {
	reg := prometheus.NewRegistry()
	n, err := NewNode(Config{Broker: nopBroker{}, Registerer: reg, Pressure: PressureOptions{
		SampleInterval: MaxPressureSampleInterval, PublishRate: 1000, MemoryLimit: -1, TopN: 3,
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	now := n.Pressure().SampledAt
	second := func(counts map[string]int) Pressure {
		for topic, c := range counts {
			publishN(t, n, topic, c)
		}
		now = now.Add(time.Second)
		n.samplePressure(now)
		return n.Pressure()
	}
	p := second(map[string]int{"hot": 2000, "warm": 500, "a": 10, "b": 20, "c": 5})
	if p.Reason != PressurePublishRate || !p.Active || p.PublishRate != 2535 {
		t.Fatalf("at 2,535/s: %+v", p)
	}
	size := func(topic string) float64 { return float64(len(Envelope(topic, "e", []byte(`{"x":1}`)))) }
	want := []TopicRate{{"hot", 2000, 2000 * size("hot")}, {"warm", 500, 500 * size("warm")}, {"b", 20, 20 * size("b")}}
	if !slices.Equal(p.TopPublishers, want) {
		t.Fatalf("top publishers %+v, want %+v", p.TopPublishers, want)
	}
	if v := gather(t, reg, "fabric_pressure", "PUBLISH_RATE"); v != 1 {
		t.Fatalf("fabric_pressure{reason=PUBLISH_RATE} = %v", v)
	}
	// 950/s is under the threshold but inside the 10% band: still on.
	if p := second(map[string]int{"hot": 950}); p.Reason != PressurePublishRate {
		t.Fatalf("at 950/s (inside the band): %s", p.Reason)
	}
	// 800/s is under the band: off after three such samples, not before.
	for i := 1; i <= 3; i++ {
		p := second(map[string]int{"hot": 800})
		if on := p.Reason == PressurePublishRate; on != (i < 3) {
			t.Fatalf("sample %d under the band: %s", i, p.Reason)
		}
	}
	if v := gather(t, reg, "fabric_pressure", "NONE"); v != 1 {
		t.Fatalf("fabric_pressure{reason=NONE} = %v", v)
	}
	// One sample at the threshold turns it on again at once.
	if p := second(map[string]int{"hot": 1000}); p.Reason != PressurePublishRate {
		t.Fatalf("back at 1,000/s: %s", p.Reason)
	}
}

// TestPressureNoFlap: a rate oscillating around the threshold turns the
// signal on once and keeps it on; it never flaps.
func TestPressureNoFlap(t *testing.T) {
	var s signal
	changes := 0
	on := false
	for i := range 100 {
		v := 1000.0
		if i%2 == 1 {
			v = 920 // dips just under the threshold, inside the band
		}
		if s.update(v, 1000, 0.1, 3) != on {
			on = !on
			changes++
		}
	}
	if changes != 1 || !on {
		t.Fatalf("%d changes around the threshold (on=%v)", changes, on)
	}
}

// TestPressureSubscribers: SUBSCRIBERS follows the subscription total with
// hysteresis, and the precedence puts PUBLISH_RATE first when both fire.
func TestPressureSubscribers(t *testing.T) {
	n, now := manualNode(t, PressureOptions{MaxSubscriptions: 50, PublishRate: 100, MemoryLimit: -1, ClearAfter: 2})
	var clients []*Client
	for i := range 10 {
		c := n.Connect(nopTransport{}, nil, "t")
		clients = append(clients, c)
		for j := range 6 {
			if err := n.Subscribe(c, "t"+strconv.Itoa(i*6+j)); err != nil {
				t.Fatal(err)
			}
		}
	}
	sample := func() Pressure {
		now = now.Add(time.Second)
		n.samplePressure(now)
		return n.Pressure()
	}
	if p := sample(); p.Reason != PressureSubscribers || p.Subscriptions != 60 || p.Connections != 10 || p.SubscriberRatio != 6 {
		t.Fatalf("60 subscriptions: %+v", p)
	}
	publishN(t, n, "x", 200)
	if p := sample(); p.Reason != PressurePublishRate || !slices.Equal(p.Firing, []PressureReason{PressurePublishRate, PressureSubscribers}) {
		t.Fatalf("both signals: reason %s, firing %v", p.Reason, p.Firing)
	}
	for _, c := range clients[:2] { // 48 left: inside the band (≥ 45)
		n.Disconnect(c, 1000, "")
	}
	for range 3 {
		if p := sample(); !slices.Contains(p.Firing, PressureSubscribers) {
			t.Fatalf("48 subscriptions (inside the band): %v", p.Firing)
		}
	}
	n.Disconnect(clients[2], 1000, "") // 42: under the band
	if p := sample(); p.Reason != PressureSubscribers {
		t.Fatalf("first sample under the band: %s", p.Reason)
	}
	if p := sample(); p.Reason != PressureNone {
		t.Fatalf("second sample under the band: %s", p.Reason)
	}
}

// TestPressureSubscriberRatio: the optional per-connection ratio.
func TestPressureSubscriberRatio(t *testing.T) {
	n, now := manualNode(t, PressureOptions{SubscriberRatio: 5, MemoryLimit: -1})
	c := n.Connect(nopTransport{}, nil, "t")
	for j := range 6 {
		_ = n.Subscribe(c, "t"+strconv.Itoa(j))
	}
	n.samplePressure(now.Add(time.Second))
	if p := n.Pressure(); p.Reason != PressureSubscribers || p.SubscriberRatio != 6 {
		t.Fatalf("6 subscriptions on one connection, ratio 5: %+v", p)
	}
}

// TestPressureMemory: real allocations turn MEMORY on and freeing them
// turns it off, with the sampler goroutine running.
func TestPressureMemory(t *testing.T) {
	runtime.GC()
	debug.FreeOSMemory()
	base, err := readGoMemory()
	if err != nil {
		t.Fatal(err)
	}
	n, err := NewNode(Config{Broker: nopBroker{}, Pressure: PressureOptions{
		SampleInterval: 10 * time.Millisecond, MemorySource: MemoryGo, MemoryLimit: base + 64<<20, MemoryRatio: 1,
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if p := n.Pressure(); p.Reason != PressureNone || p.MemoryLimit != base+64<<20 {
		t.Fatalf("before: %+v", p)
	}
	ballast := make([]byte, 128<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = 1
	}
	waitUntil(t, "MEMORY with 128 MiB allocated", func() bool { return n.Pressure().Reason == PressureMemory })
	p := n.Pressure()
	t.Logf("with ballast: %d MiB of a %d MiB limit", p.MemoryBytes>>20, p.MemoryLimit>>20)
	runtime.KeepAlive(ballast)
	ballast = nil
	runtime.GC()
	debug.FreeOSMemory()
	waitUntil(t, "NONE once the ballast is freed", func() bool { return n.Pressure().Reason == PressureNone })
}

// TestPressureRSS: the default source on Linux reads the resident set.
func TestPressureRSS(t *testing.T) {
	if _, err := readRSS(); err != nil {
		t.Skip("no /proc/self/statm:", err)
	}
	n, err := NewNode(Config{Broker: nopBroker{}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	p := n.Pressure()
	if n.pressure.opts.MemorySource != MemoryRSS || p.MemoryBytes <= 0 || p.MemoryLimit <= 0 || p.Reason != PressureNone {
		t.Fatalf("default pressure: %+v (source %s)", p, n.pressure.opts.MemorySource)
	}
	t.Logf("RSS %d MiB, limit %d MiB", p.MemoryBytes>>20, p.MemoryLimit>>20)
}

// TestPressureTopicBound: past MaxTopics, publishes count in the total only;
// topics that went quiet are dropped at the next sample.
func TestPressureTopicBound(t *testing.T) {
	n, now := manualNode(t, PressureOptions{MaxTopics: 100, MemoryLimit: -1})
	for i := range 1000 {
		publishN(t, n, fmt.Sprintf("topic:%d", i), 1)
	}
	if got := n.pressure.pubs.tracked.Load(); got != 100 {
		t.Fatalf("%d topics tracked, want 100", got)
	}
	n.samplePressure(now.Add(time.Second))
	if p := n.Pressure(); p.PublishRate != 1000 || len(p.TopPublishers) != DefaultPressureTopN {
		t.Fatalf("rate %v, %d top publishers", p.PublishRate, len(p.TopPublishers))
	}
	if got := n.pressure.pubs.tracked.Load(); got != 100 {
		t.Fatalf("%d topics tracked after a sample, want the 100 that published", got)
	}
	n.samplePressure(now.Add(2 * time.Second))
	if got := n.pressure.pubs.tracked.Load(); got != 0 {
		t.Fatalf("%d topics tracked after a quiet window", got)
	}
}

// TestPressureOff: a negative SampleInterval turns sampling off.
func TestPressureOff(t *testing.T) {
	n, err := NewNode(Config{Broker: nopBroker{}, Pressure: PressureOptions{SampleInterval: -1}})
	if err != nil {
		t.Fatal(err)
	}
	publishN(t, n, "x", 10)
	if p := n.Pressure(); p.Reason != PressureNone || !p.SampledAt.IsZero() {
		t.Fatalf("%+v", p)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestPressureCloseStopsSampler: Node.Close waits for the sampler.
func TestPressureCloseStopsSampler(t *testing.T) {
	n, err := NewNode(Config{Broker: nopBroker{}, Pressure: PressureOptions{SampleInterval: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a few samples", func() bool { return time.Since(n.Pressure().SampledAt) < 50*time.Millisecond })
	_ = n.Close()
	select {
	case <-n.pressure.done:
	default:
		t.Fatal("the sampler is still running after Close")
	}
	_ = n.Close()
}

func TestPressureOptionsInvalid(t *testing.T) {
	for _, o := range []PressureOptions{{MemorySource: "swap"}, {Hysteresis: 1}, {MemoryRatio: -1}, {SampleInterval: time.Minute}} {
		if _, err := NewNode(Config{Broker: nopBroker{}, Pressure: o}); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gather returns the value of name{label=value} (first label) in reg.
func gather(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) > 0 && m.GetLabel()[0].GetValue() == label {
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no %s{%s}", name, label)
	return 0
}

// BenchmarkPublishCounting measures what per-topic publish counting adds to
// a publish (nopBroker: the publish itself costs almost nothing), from
// every core at once over 1,000 topics.
func BenchmarkPublishCounting(b *testing.B) {
	topics := make([]string, 1000)
	envs := make([][]byte, len(topics))
	for i := range topics {
		topics[i] = "bench:" + strconv.Itoa(i)
		envs[i] = Envelope(topics[i], "e", []byte(`{"x":1}`))
	}
	for _, tc := range []struct {
		name     string
		interval time.Duration
	}{{"off", -1}, {"on", MaxPressureSampleInterval}} {
		b.Run("pressure="+tc.name, func(b *testing.B) {
			n, err := NewNode(Config{Broker: nopBroker{}, Pressure: PressureOptions{SampleInterval: tc.interval}})
			if err != nil {
				b.Fatal(err)
			}
			defer n.Close()
			ctx := context.Background()
			if tc.interval > 0 { // the steady state: every topic was published in the previous window
				for k := range topics {
					_, _ = n.PublishEnvelope(ctx, topics[k], envs[k])
				}
				n.samplePressure(time.Now())
			}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := 0
				for pb.Next() {
					i++
					k := i % len(topics)
					_, _ = n.PublishEnvelope(ctx, topics[k], envs[k])
				}
			})
		})
	}
}
