package memory_test

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
	"github.com/prometheus/client_golang/prometheus"
)

func TestCrossNodePublish(t *testing.T) {
	b := newBackend(t, memory.Options{})
	a, other := newNode(t, b), newNode(t, b)
	ctx := ctxT(t)
	ra, rb := &recorder{}, &recorder{}
	ca := a.Connect(ra, nil, "127.0.0.1:1")
	cb := other.Connect(rb, nil, "127.0.0.1:2")
	if err := a.Subscribe(ca, "chat:1"); err != nil {
		t.Fatal(err)
	}
	if err := other.Subscribe(cb, "chat:1"); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := other.Publish(ctx, "chat:1", "msg", i); err != nil {
			t.Fatal(err)
		}
	}
	want := `{"topic":"chat:1","event":"msg","data":0}
{"topic":"chat:1","event":"msg","data":1}
{"topic":"chat:1","event":"msg","data":2}`
	// Delivery is synchronous: no waiting.
	if got := joinLines(ra.payloads()); got != want {
		t.Fatalf("node a got\n%s\nwant\n%s", got, want)
	}
	if got := joinLines(rb.payloads()); got != want {
		t.Fatalf("node b got\n%s\nwant\n%s", got, want)
	}
	// Once a unsubscribes, only b's subscriber gets messages.
	a.Unsubscribe(ca, "chat:1")
	if _, err := other.Publish(ctx, "chat:1", "msg", 3); err != nil {
		t.Fatal(err)
	}
	if n := len(ra.payloads()); n != 3 {
		t.Fatalf("a got %d messages after unsubscribing, want 3", n)
	}
	if n := len(rb.payloads()); n != 4 {
		t.Fatalf("b got %d messages, want 4", n)
	}
}

func TestPersistentPublishDeliversSeqFrames(t *testing.T) {
	b := newBackend(t, memory.Options{})
	a, other := newNode(t, b), newNode(t, b)
	ctx := ctxT(t)
	r := &recorder{}
	c := a.Connect(r, nil, "127.0.0.1:1")
	if err := a.Subscribe(c, "doc:1"); err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := 1; i <= 5; i++ {
		seq, err := other.Publish(ctx, "doc:1", "edit", i, fabric.Persist())
		if err != nil {
			t.Fatal(err)
		}
		if seq != uint64(i) {
			t.Fatalf("publish %d got seq %d", i, seq)
		}
		want = append(want, fmt.Sprintf(`{"topic":"doc:1","event":"edit","data":%d,"seq":%d}`, i, i))
	}
	if got := joinLines(r.payloads()); got != joinLines(want) {
		t.Fatalf("got\n%s\nwant\n%s", got, joinLines(want))
	}
	// The other node reads them back from the shared history.
	rng, err := other.Since(ctx, "doc:1", 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rng.Messages) != 3 || rng.Messages[0].Seq != 3 || !rng.Complete {
		t.Fatalf("since 2: %+v", rng)
	}
}

// orderChecker is a Receiver that checks a topic's stored messages arrive
// in sequence order, each naming the one before.
type orderChecker struct {
	last   uint64
	n      int
	errMu  sync.Mutex
	err    error
	inside atomic.Bool
}

func (o *orderChecker) Receive(_ []byte, seq, prev uint64) {
	if !o.inside.CompareAndSwap(false, true) {
		o.fail(errors.New("two Receive calls at once"))
	}
	defer o.inside.Store(false)
	if seq != o.last+1 || prev != o.last {
		o.fail(fmt.Errorf("got seq %d prev %d after %d", seq, prev, o.last))
	}
	o.last = seq
	o.n++
}

func (o *orderChecker) fail(err error) {
	o.errMu.Lock()
	if o.err == nil {
		o.err = err
	}
	o.errMu.Unlock()
}

func TestConcurrentAppendsArriveInSeqOrder(t *testing.T) {
	b := newBackend(t, memory.Options{MaxPerTopic: 50})
	ctx := ctxT(t)
	checkers := []*orderChecker{{}, {}}
	for _, c := range checkers {
		sub, err := b.Broker().Subscribe("t", c)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	const writers, each = 4, 200
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			br := b.Broker()
			for i := range each {
				if i%3 == 0 { // plain publishes interleave, with seq 0
					_ = br.Publish(ctx, "other", []byte(`{}`))
				}
				if _, err := b.History().Append(ctx, "t", []byte(`{"x":1}`), ""); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for i, c := range checkers {
		if c.err != nil {
			t.Fatalf("receiver %d: %v", i, c.err)
		}
		if c.n != writers*each {
			t.Fatalf("receiver %d got %d messages, want %d", i, c.n, writers*each)
		}
	}
}

type funcReceiver func(env []byte, seq, prev uint64)

func (f funcReceiver) Receive(env []byte, seq, prev uint64) { f(env, seq, prev) }

func TestSubscriptionLifecycle(t *testing.T) {
	b := newBackend(t, memory.Options{})
	ctx := ctxT(t)
	br1, br2 := b.Broker(), b.Broker()
	var n1, n2, self atomic.Int32
	if _, err := br1.Subscribe("x", funcReceiver(func([]byte, uint64, uint64) { n1.Add(1) })); err != nil {
		t.Fatal(err)
	}
	s2, err := br2.Subscribe("x", funcReceiver(func([]byte, uint64, uint64) { n2.Add(1) }))
	if err != nil {
		t.Fatal(err)
	}
	// A receiver may unsubscribe itself from inside Receive.
	var selfSub fabric.Subscription
	selfSub, err = br2.Subscribe("x", funcReceiver(func([]byte, uint64, uint64) {
		self.Add(1)
		_ = selfSub.Unsubscribe()
	}))
	if err != nil {
		t.Fatal(err)
	}
	_ = br2.Publish(ctx, "x", []byte(`{}`))
	_ = br2.Publish(ctx, "x", []byte(`{}`))
	if n1.Load() != 2 || n2.Load() != 2 || self.Load() != 1 {
		t.Fatalf("deliveries %d %d %d, want 2 2 1", n1.Load(), n2.Load(), self.Load())
	}
	// Unsubscribe is idempotent; closing br1 stops only br1's feeds.
	if err := s2.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if _, err := br2.Subscribe("x", funcReceiver(func([]byte, uint64, uint64) { n2.Add(1) })); err != nil {
		t.Fatal(err)
	}
	_ = br1.Close()
	_ = br1.Close()
	_ = br2.Publish(ctx, "x", []byte(`{}`))
	if n1.Load() != 2 || n2.Load() != 3 {
		t.Fatalf("after br1.Close: deliveries %d %d, want 2 3", n1.Load(), n2.Load())
	}
	if _, err := br1.Subscribe("x", funcReceiver(func([]byte, uint64, uint64) {})); !errors.Is(err, memory.ErrClosed) {
		t.Fatalf("subscribe on a closed broker: %v", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(br2)
	if v := gauge(t, reg, "fabric_memory_subscriptions"); v != 1 {
		t.Fatalf("fabric_memory_subscriptions = %v, want 1", v)
	}
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestCloseStopsEverything(t *testing.T) {
	before := runtime.NumGoroutine()
	b := memory.New(memory.Options{MaxAge: 10 * time.Millisecond, SweepInterval: time.Millisecond})
	ctx := ctxT(t)
	if _, err := b.History().Append(ctx, "t", []byte(`{}`), ""); err != nil {
		t.Fatal(err)
	}
	b.PresenceStore().Put(fabric.PresenceEntry{Topic: "t", Key: "k", Instance: "i"}, time.Second)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the backend's goroutines to stop", func() bool { return runtime.NumGoroutine() <= before })
	if _, err := b.History().Append(ctx, "t", []byte(`{}`), ""); !errors.Is(err, memory.ErrClosed) {
		t.Fatalf("append after close: %v", err)
	}
	if err := b.Broker().Publish(ctx, "t", []byte(`{}`)); !errors.Is(err, memory.ErrClosed) {
		t.Fatalf("publish after close: %v", err)
	}
	if err := b.PresenceStore().Put(fabric.PresenceEntry{Topic: "t"}, time.Second).Wait(ctx); !errors.Is(err, memory.ErrClosed) {
		t.Fatalf("presence put after close: %v", err)
	}
}

func TestPublishDoesNotAllocatePerSubscriber(t *testing.T) {
	b := newBackend(t, memory.Options{})
	var n atomic.Int64
	for range 8 {
		if _, err := b.Broker().Subscribe("hot", funcReceiver(func([]byte, uint64, uint64) { n.Add(1) })); err != nil {
			t.Fatal(err)
		}
	}
	br, ctx, env := b.Broker(), ctxT(t), []byte(`{"topic":"hot","event":"e","data":1}`)
	if allocs := testing.AllocsPerRun(100, func() { _ = br.Publish(ctx, "hot", env) }); allocs != 0 {
		t.Fatalf("Publish to 8 subscribers: %v allocations, want 0", allocs)
	}
	if n.Load() < 800 {
		t.Fatalf("%d deliveries", n.Load())
	}
}

func TestClosedBrokerRefusesPublishes(t *testing.T) {
	b := newBackend(t, memory.Options{})
	br := b.Broker()
	_ = br.Close()
	if err := br.Publish(ctxT(t), "x", []byte(`{}`)); !errors.Is(err, memory.ErrClosed) {
		t.Fatalf("publish on a closed broker: %v", err)
	}
	if err := b.Broker().Publish(ctxT(t), "x", []byte(`{}`)); err != nil {
		t.Fatalf("publish on another broker: %v", err)
	}
}
