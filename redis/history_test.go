package redis_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
	"github.com/redis/rueidis"
)

// sharedBackend is a Backend on the shared test Redis under a fresh prefix
// whose keys are deleted at the end.
func sharedBackend(t *testing.T, o redis.Options) *redis.Backend {
	t.Helper()
	url := needRedis(t)
	if o.Prefix == "" {
		o.Prefix = fabrictest.TestPrefix(t)
	}
	o.URL = url
	prefix := o.Prefix
	t.Cleanup(func() { dropPrefix(t, url, prefix, ":*") })
	return newBackend(t, o)
}

func appendN(t *testing.T, h fabric.History, topic string, n int) []fabric.Position {
	t.Helper()
	out := make([]fabric.Position, n)
	for i := range out {
		pos, err := h.Append(context.Background(), topic, fabric.Envelope(topic, "m", fmt.Appendf(nil, "%d", i)), "")
		if err != nil {
			t.Fatal(err)
		}
		out[i] = pos
	}
	return out
}

// TestHistorySequences: contiguous sequences from 1 in one epoch, the
// epoch known before the first message, the per-topic cap, Complete
// exactly when a message after the read's start is gone.
func TestHistorySequences(t *testing.T) {
	b := sharedBackend(t, redis.Options{MaxPerTopic: 5})
	h := b.History()
	ctx := context.Background()
	const topic = "feed:{odd} topic ✓"
	before, err := h.Epoch(ctx, topic)
	if err != nil || before == "" {
		t.Fatalf("Epoch before any message: %q, %v", before, err)
	}
	ps := appendN(t, h, topic, 8)
	for i, p := range ps {
		if p.Seq != uint64(i+1) || p.Epoch != before {
			t.Fatalf("append %d: %+v; want seq %d in the epoch Epoch gave before (%s)", i, p, i+1, before)
		}
	}
	for _, tc := range []struct {
		since    uint64
		want     []uint64
		complete bool
	}{
		{0, []uint64{4, 5, 6, 7, 8}, true},  // everything kept
		{1, []uint64{4, 5, 6, 7, 8}, false}, // 2 and 3 are gone
		{2, []uint64{4, 5, 6, 7, 8}, false}, // 3 is gone
		{3, []uint64{4, 5, 6, 7, 8}, true},  // nothing after 3 is gone
		{7, []uint64{8}, true},
		{8, nil, true},
		{9, nil, false}, // beyond the last: another epoch's
	} {
		rng, err := h.Since(ctx, topic, tc.since, 0)
		if err != nil || !slices.Equal(seqsOf(rng), tc.want) || rng.Complete != tc.complete || rng.Epoch != before {
			t.Errorf("Since(%d) = %v complete %v epoch %s, %v; want %v complete %v", tc.since, seqsOf(rng), rng.Complete, rng.Epoch, err, tc.want, tc.complete)
		}
	}
	rng, err := h.Since(ctx, topic, 3, 2)
	if err != nil || !slices.Equal(seqsOf(rng), []uint64{4, 5}) || !rng.More {
		t.Fatalf("Since(3, 2) = %v more %v, %v", seqsOf(rng), rng.More, err)
	}
	if string(rng.Messages[0].Envelope) != string(fabric.Envelope(topic, "m", []byte("3"))) {
		t.Fatalf("stored envelope %s", rng.Messages[0].Envelope)
	}
	last, err := h.Last(ctx, topic)
	if err != nil || last.Seq != 8 || last.Epoch != before {
		t.Fatalf("Last = %+v, %v", last, err)
	}
}

// TestHistoryKeysLost: a topic whose keys disappear (an operator, eviction,
// a restart without persistence) starts a new epoch, and whatever part is
// left never passes for the new incarnation's.
func TestHistoryKeysLost(t *testing.T) {
	url := needRedis(t)
	b := sharedBackend(t, redis.Options{})
	h := b.History()
	ctx := context.Background()
	c := rawClient(t, url)
	prefix := b.Options().Prefix

	// The stream alone is lost: the retained messages are gone, the
	// sequence and the epoch stay, and a read says so.
	ps := appendN(t, h, "feed:a", 3)
	del(t, c, prefix, ":*:hs:feed:a")
	rng, err := h.Since(ctx, "feed:a", 1, 0)
	if err != nil || rng.Complete || len(rng.Messages) != 0 || rng.Epoch != ps[0].Epoch {
		t.Fatalf("after losing the stream: %+v, %v; want nothing, incomplete, same epoch", rng, err)
	}
	if p, err := h.Append(ctx, "feed:a", []byte(`{}`), ""); err != nil || p.Seq != 4 || p.Epoch != ps[0].Epoch {
		t.Fatalf("append after losing the stream: %+v, %v; want seq 4 in the same epoch", p, err)
	}

	// The meta alone is lost: a new epoch from seq 1, and the old messages
	// are dropped rather than served as the new incarnation's.
	ps = appendN(t, h, "feed:b", 3)
	del(t, c, prefix, ":*:hm:feed:b")
	p, err := h.Append(ctx, "feed:b", []byte(`{"new":1}`), "")
	if err != nil || p.Seq != 1 || p.Epoch == ps[0].Epoch {
		t.Fatalf("append after losing the meta: %+v, %v; want seq 1 in a new epoch", p, err)
	}
	rng, err = h.Since(ctx, "feed:b", 0, 0)
	if err != nil || !slices.Equal(seqsOf(rng), []uint64{1}) || string(rng.Messages[0].Envelope) != `{"new":1}` {
		t.Fatalf("the new incarnation reads %+v, %v", rng, err)
	}
}

// TestHistoryMaxAge: messages older than MaxAge are dropped (a read after
// them is incomplete), and a topic idle for MaxAge loses its keys: its next
// message starts a new epoch.
func TestHistoryMaxAge(t *testing.T) {
	b := sharedBackend(t, redis.Options{MaxAge: 300 * time.Millisecond})
	h := b.History()
	ctx := context.Background()
	ps := appendN(t, h, "feed:age", 3)
	fabrictest.WaitFor(t, 5*time.Second, "the messages to age out", func() bool {
		rng, err := h.Since(ctx, "feed:age", 0, 0)
		return err == nil && len(rng.Messages) == 0
	})
	if rng, err := h.Since(ctx, "feed:age", 1, 0); err == nil && rng.Epoch == ps[0].Epoch && rng.Complete {
		t.Fatalf("Since(1) after the others aged out: %+v; want incomplete", rng)
	}
	fabrictest.WaitFor(t, 5*time.Second, "the idle topic's epoch to change", func() bool {
		p, err := h.Append(ctx, "feed:age", []byte(`{}`), "")
		return err == nil && p.Epoch != ps[0].Epoch && p.Seq == 1
	})
}

// TestIdempotentAcrossInstances: two instances appending the same message
// id store and deliver it once, and both get its position.
func TestIdempotentAcrossInstances(t *testing.T) {
	url := needRedis(t)
	prefix := fabrictest.TestPrefix(t)
	t.Cleanup(func() { dropPrefix(t, url, prefix, ":*") })
	a := newBackend(t, redis.Options{URL: url, Prefix: prefix})
	b := newBackend(t, redis.Options{URL: url, Prefix: prefix})
	r := &countReceiver{}
	if _, err := a.Broker().Subscribe("feed:idem", r); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p1, err := a.History().Append(ctx, "feed:idem", []byte(`{"x":1}`), "row-7")
	if err != nil {
		t.Fatal(err)
	}
	p2, err := b.History().Append(ctx, "feed:idem", []byte(`{"x":1}`), "row-7")
	if err != nil || p2 != p1 {
		t.Fatalf("second instance: %+v, %v; want %+v", p2, err, p1)
	}
	p3, err := b.History().Append(ctx, "feed:idem", []byte(`{"x":2}`), "row-8")
	if err != nil || p3.Seq != p1.Seq+1 {
		t.Fatalf("a new id: %+v, %v", p3, err)
	}
	fabrictest.WaitFor(t, 5*time.Second, "two deliveries", func() bool { return r.got.Load() >= 2 })
	if r.got.Load() != 2 {
		t.Fatalf("%d deliveries, want 2", r.got.Load())
	}
}

// TestAppendReadYourWrites: when Append returns, the appending instance's
// own subscribers have been handed the message (its reply and the message
// travel on different connections).
func TestAppendReadYourWrites(t *testing.T) {
	b := sharedBackend(t, redis.Options{})
	r := &countReceiver{}
	if _, err := b.Broker().Subscribe("feed:ryw", r); err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		p, err := b.History().Append(context.Background(), "feed:ryw", []byte(`{}`), "")
		if err != nil {
			t.Fatal(err)
		}
		if got := r.last.Load(); got != p.Seq {
			t.Fatalf("append %d returned seq %d while the local subscriber had %d", i, p.Seq, got)
		}
	}
}

func rawClient(t *testing.T, url string) rueidis.Client {
	t.Helper()
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	opt.DisableCache = true
	c, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// del deletes the keys of prefix matching pattern.
func del(t *testing.T, c rueidis.Client, prefix, pattern string) {
	t.Helper()
	ctx := context.Background()
	keys, err := c.Do(ctx, c.B().Keys().Pattern(prefix+pattern).Build()).AsStrSlice()
	if err != nil || len(keys) == 0 {
		t.Fatalf("keys %s%s: %v %v", prefix, pattern, keys, err)
	}
	for _, k := range keys {
		if err := c.Do(ctx, c.B().Del().Key(k).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
}
