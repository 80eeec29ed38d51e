package memory_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
	"github.com/prometheus/client_golang/prometheus"
)

func appendN(t *testing.T, h *memory.History, topic string, n int) fabric.Position {
	t.Helper()
	var pos fabric.Position
	for i := range n {
		var err error
		if pos, err = h.Append(context.Background(), topic, fmt.Appendf(nil, `{"i":%d}`, i), ""); err != nil {
			t.Fatal(err)
		}
	}
	return pos
}

func since(t *testing.T, h *memory.History, topic string, seq uint64, limit int) fabric.Range {
	t.Helper()
	rng, err := h.Since(context.Background(), topic, seq, limit)
	if err != nil {
		t.Fatal(err)
	}
	return rng
}

func seqs(rng fabric.Range) []uint64 {
	out := []uint64{}
	for _, m := range rng.Messages {
		out = append(out, m.Seq)
	}
	return out
}

func TestSinceRules(t *testing.T) {
	b := newBackend(t, memory.Options{MaxPerTopic: 3})
	h := b.History()
	ctx := ctxT(t)

	// No history yet: nothing is missing after 0, anything after is unknown.
	e0, _ := h.Epoch(ctx, "t")
	if r := since(t, h, "t", 0, 0); !r.Complete || len(r.Messages) != 0 || r.Epoch != e0 {
		t.Fatalf("empty topic, since 0: %+v", r)
	}
	if r := since(t, h, "t", 1, 0); r.Complete {
		t.Fatalf("empty topic, since 1: %+v", r)
	}
	if p, _ := h.Last(ctx, "t"); p.Seq != 0 || p.Epoch != e0 {
		t.Fatalf("empty topic, last: %+v", p)
	}

	pos := appendN(t, h, "t", 5) // keeps 3, 4, 5
	if pos.Seq != 5 || pos.Epoch != e0 {
		t.Fatalf("append: %+v; the epoch before the first message was %q", pos, e0)
	}
	for _, c := range []struct {
		seq      uint64
		limit    int
		want     string
		complete bool
		more     bool
	}{
		{0, 0, "[3 4 5]", true, false}, // a reader with nothing loses nothing
		{1, 0, "[3 4 5]", false, false},
		{2, 0, "[3 4 5]", true, false},
		{3, 0, "[4 5]", true, false},
		{5, 0, "[]", true, false},
		{6, 0, "[]", false, false}, // beyond this epoch
		{2, 2, "[3 4]", true, true},
		{3, 2, "[4 5]", true, false},
		{0, 1, "[3]", true, true},
	} {
		r := since(t, h, "t", c.seq, c.limit)
		if got := fmt.Sprint(seqs(r)); got != c.want || r.Complete != c.complete || r.More != c.more || r.Epoch != e0 {
			t.Errorf("Since(%d, %d) = %s complete=%v more=%v epoch=%q, want %s %v %v", c.seq, c.limit, got, r.Complete, r.More, r.Epoch, c.want, c.complete, c.more)
		}
	}
	if r := since(t, h, "t", 3, 0); string(r.Messages[0].Envelope) != `{"i":3}` {
		t.Fatalf("envelope of seq 4: %s", r.Messages[0].Envelope)
	}
	if p, _ := h.Last(ctx, "t"); p.Seq != 5 || p.Epoch != e0 {
		t.Fatalf("last: %+v", p)
	}
	// Another topic's sequences are its own.
	if p := appendN(t, h, "u", 1); p.Seq != 1 {
		t.Fatalf("first seq of another topic: %d", p.Seq)
	}
}

func TestMaxTopicsEvictsLeastRecentlyAppended(t *testing.T) {
	b := newBackend(t, memory.Options{MaxTopics: 3})
	h := b.History()
	ctx := ctxT(t)
	for _, topic := range []string{"a", "b", "c"} {
		appendN(t, h, topic, 2)
	}
	appendN(t, h, "a", 1) // a is now the most recent, b the least
	epochB, _ := h.Epoch(ctx, "b")
	appendN(t, h, "d", 1)

	if r := since(t, h, "b", 2, 0); r.Complete || len(r.Messages) != 0 || r.Epoch == epochB {
		t.Fatalf("evicted topic b: %+v (old epoch %q)", r, epochB)
	}
	if p, _ := h.Last(ctx, "b"); p.Seq != 0 {
		t.Fatalf("evicted topic b: last %+v", p)
	}
	newEpoch, _ := h.Epoch(ctx, "b")
	if newEpoch == epochB {
		t.Fatal("evicted topic b kept its epoch")
	}
	for topic, last := range map[string]uint64{"a": 3, "c": 2, "d": 1} {
		if r := since(t, h, topic, 0, 0); !r.Complete || len(r.Messages) != int(last) {
			t.Fatalf("topic %s: %+v", topic, r)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(b.Broker())
	if v := gauge(t, reg, "fabric_memory_history_topics"); v != 3 {
		t.Fatalf("fabric_memory_history_topics = %v", v)
	}
	if v := gauge(t, reg, "fabric_memory_history_evictions_total"); v != 1 {
		t.Fatalf("fabric_memory_history_evictions_total = %v", v)
	}

	// b starts again at 1 in the epoch announced since it was dropped; that
	// evicts c, now the least recently appended.
	if p := appendN(t, h, "b", 1); p.Seq != 1 || p.Epoch != newEpoch {
		t.Fatalf("b again: %+v, want seq 1 epoch %q", p, newEpoch)
	}
	if r := since(t, h, "c", 2, 0); r.Complete {
		t.Fatalf("c should be evicted: %+v", r)
	}
	if r := since(t, h, "a", 3, 0); !r.Complete {
		t.Fatalf("a should be kept: %+v", r)
	}
}

func TestManyTopicsStayBounded(t *testing.T) {
	b := newBackend(t, memory.Options{MaxTopics: 50})
	h := b.History()
	for i := range 500 {
		appendN(t, h, fmt.Sprintf("t%d", i), 1)
	}
	for i := range 450 {
		if r := since(t, h, fmt.Sprintf("t%d", i), 1, 0); r.Complete {
			t.Fatalf("t%d should have been evicted", i)
		}
	}
	for i := 450; i < 500; i++ {
		if r := since(t, h, fmt.Sprintf("t%d", i), 1, 0); !r.Complete {
			t.Fatalf("t%d should be kept", i)
		}
	}
}

func TestWipeHistory(t *testing.T) {
	b := newBackend(t, memory.Options{})
	h := b.History()
	ctx := ctxT(t)
	old := appendN(t, h, "t", 3)
	b.WipeHistory()
	e, _ := h.Epoch(ctx, "t")
	if e == old.Epoch {
		t.Fatal("epoch unchanged by WipeHistory")
	}
	if r := since(t, h, "t", 2, 0); r.Complete || len(r.Messages) != 0 {
		t.Fatalf("old sequence after a wipe: %+v", r)
	}
	if p := appendN(t, h, "t", 1); p.Seq != 1 || p.Epoch != e {
		t.Fatalf("append after a wipe: %+v, want seq 1 epoch %q", p, e)
	}
}

func TestMaxAge(t *testing.T) {
	const age = 50 * time.Millisecond
	// The sweep is slow here: reads must drop expired messages by themselves.
	b := newBackend(t, memory.Options{MaxAge: age, SweepInterval: time.Hour})
	h := b.History()
	ctx := ctxT(t)
	start := time.Now()
	appendN(t, h, "t", 2)
	r := since(t, h, "t", 0, 0)
	if time.Since(start) < age && (len(r.Messages) != 2 || !r.Complete) {
		t.Fatalf("fresh messages: %+v", r)
	}
	waitFor(t, "messages to expire", func() bool { return len(since(t, h, "t", 0, 0).Messages) == 0 })
	if time.Since(start) < age {
		t.Fatalf("messages expired after %v, before MaxAge", time.Since(start))
	}
	if r := since(t, h, "t", 2, 0); !r.Complete {
		t.Fatalf("nothing after the last seq was lost: %+v", r)
	}
	if r := since(t, h, "t", 1, 0); r.Complete {
		t.Fatalf("seq 2 expired: %+v", r)
	}
	if p, _ := h.Last(ctx, "t"); p.Seq != 2 {
		t.Fatalf("last after expiry: %+v", p)
	}
	if p := appendN(t, h, "t", 1); p.Seq != 3 {
		t.Fatalf("next seq after expiry: %+v", p)
	}
}

func TestMaxAgeSweep(t *testing.T) {
	b := newBackend(t, memory.Options{MaxAge: 20 * time.Millisecond, SweepInterval: 5 * time.Millisecond})
	appendN(t, b.History(), "t", 3)
	if n := b.Retained("t"); n != 3 && n != 0 {
		t.Fatalf("retained %d", n)
	}
	waitFor(t, "the sweep to drop expired messages", func() bool { return b.Retained("t") == 0 })
}
