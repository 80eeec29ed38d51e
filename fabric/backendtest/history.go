package backendtest

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// view is what a client of a resume has: with subscribe (subscribe with
// since) every message on the topic in arrival order; with a replay (the
// svelte-adapter-uws plugin) the "msg" events of the replay topic until
// "end", then the live messages, the ones before "end" being dropped as the
// plugin does.
func view(r *recorder, topic string, subscribe bool) (seqs []uint64, end *fabric.ResumeResult) {
	replay := fabric.ReplayTopicPrefix + topic
	for _, m := range r.snapshot() {
		switch {
		case m.Topic == replay && m.Event == "end":
			var res fabric.ResumeResult
			_ = json.Unmarshal(m.Data, &res)
			end = &res
		case m.Topic == replay && m.Event == "msg":
			var d struct{ Seq uint64 }
			_ = json.Unmarshal(m.Data, &d)
			seqs = append(seqs, d.Seq)
		case m.Topic == topic && m.Event == "m" && (subscribe || end != nil):
			seqs = append(seqs, m.Seq)
		}
	}
	return seqs, end
}

// testResumeSeam: while one instance publishes without pause, clients on
// the other drop at random points and resume (half with subscribe+since,
// half with the replay protocol) on fresh connections: each ends up with
// every message exactly once, in order, recovered.
func testResumeSeam(t *testing.T, b Backend) {
	d := b.New(t, Options{MaxPerTopic: 100_000})
	pubNode, subNode := node(t, d.Instance(t), all), node(t, d.Instance(t), all)
	const topic, clients = "feed:seam", 16
	ctx := ctxFor(t, 120*time.Second)
	// Interest spread before the clock starts.
	warm := newRecorder()
	if err := subNode.Subscribe(subNode.Connect(warm, nil, "test"), topic); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "interest to reach the publishing instance", func() bool {
		if _, err := pubNode.Publish(ctx, topic, "probe", nil); err != nil {
			t.Fatal(err)
		}
		return len(warm.on(topic)) > 0
	})

	type client struct {
		cut       int
		subscribe bool
		before    []uint64 // what the dropped connection had
		rec       *recorder
		resumed   atomic.Bool
		err       error
	}
	cs := make([]*client, clients)
	for i := range cs {
		cs[i] = &client{cut: 1 + rand.IntN(150), subscribe: i%2 == 0}
	}
	var published []uint64
	var pubMu sync.Mutex
	stop := make(chan struct{})
	pubDone := make(chan error, 1)
	go func() {
		defer close(pubDone)
		for i := 0; ; i++ {
			seq, err := pubNode.Publish(ctx, topic, "m", i)
			if err != nil {
				pubDone <- err
				return
			}
			pubMu.Lock()
			published = append(published, seq)
			pubMu.Unlock()
			select {
			case <-stop:
				return
			default:
			}
			if i >= 20_000 {
				pubDone <- fmt.Errorf("published %d messages and the resumes are still not done", i)
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for _, c := range cs {
		first := newRecorder()
		conn := subNode.Connect(first, nil, "test")
		if err := subNode.Subscribe(conn, topic); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			deadline := time.Now().Add(60 * time.Second)
			for count(first.on(topic), "m") < c.cut {
				if time.Now().After(deadline) {
					c.err = fmt.Errorf("no %d messages before the cut", c.cut)
					return
				}
				select {
				case <-first.notify:
				case <-time.After(10 * time.Millisecond):
				}
			}
			subNode.Disconnect(conn, 1000, "") // vanish mid-stream; later deliveries are lost to it
			for _, m := range first.on(topic) {
				if m.Event == "m" {
					c.before = append(c.before, m.Seq)
				}
			}
			since := c.before[len(c.before)-1]
			c.rec = newRecorder()
			conn2 := subNode.Connect(c.rec, nil, "test")
			if !c.subscribe {
				if err := subNode.Subscribe(conn2, topic); err != nil {
					c.err = err
					return
				}
			}
			done := make(chan error, 1)
			err := subNode.Resume(ctx, conn2, fabric.ResumeRequest{Topic: topic, Since: since, Subscribe: c.subscribe},
				func(_ fabric.ResumeResult, err error) { done <- err })
			if err == nil {
				err = <-done
			}
			c.err = err
			c.resumed.Store(true)
		})
	}
	wg.Wait()
	// Publish a little more after the last resume, so that every seam is
	// crossed by live traffic.
	pubMu.Lock()
	n := len(published)
	pubMu.Unlock()
	waitFor(t, 30*time.Second, "50 more publishes", func() bool {
		pubMu.Lock()
		defer pubMu.Unlock()
		return len(published) >= n+50
	})
	close(stop)
	if err := <-pubDone; err != nil {
		t.Fatal(err)
	}
	last := published[len(published)-1]
	for i, c := range cs {
		if c.err != nil {
			t.Fatalf("client %d: %v", i, c.err)
		}
		waitFor(t, 30*time.Second, fmt.Sprintf("client %d to reach the last seq", i), func() bool {
			got, _ := view(c.rec, topic, c.subscribe)
			return len(got) > 0 && got[len(got)-1] >= last
		})
		got, end := view(c.rec, topic, c.subscribe)
		full := append(slices.Clone(c.before), got...)
		start := slices.Index(published, c.before[0])
		want := published[start:]
		if !slices.Equal(full, want) {
			at := firstDiff(full, want)
			t.Fatalf("client %d (subscribe=%v, cut after %d): %d messages, want %d; first difference at %d: got %v, want %v",
				i, c.subscribe, len(c.before), len(full), len(want), at, around(full, at), around(want, at))
		}
		if end == nil || !end.Recovered {
			t.Fatalf("client %d: end %+v, want recovered", i, end)
		}
	}
}

func firstDiff(a, b []uint64) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func around(s []uint64, i int) []uint64 {
	return s[max(0, i-3):min(len(s), i+3)]
}

// publishN publishes n messages on topic and returns their seqs.
func publishN(t *testing.T, ctx context.Context, n *fabric.Node, topic string, count int) []uint64 {
	t.Helper()
	out := make([]uint64, count)
	for i := range out {
		seq, err := n.Publish(ctx, topic, "m", i)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = seq
	}
	return out
}

// resumeNow resumes a new connection of n and waits for its end.
func resumeNow(t *testing.T, ctx context.Context, n *fabric.Node, req fabric.ResumeRequest) (*recorder, fabric.ResumeResult) {
	t.Helper()
	r := newRecorder()
	c := n.Connect(r, nil, "test")
	done := make(chan error, 1)
	if err := n.Resume(ctx, c, req, func(_ fabric.ResumeResult, err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	res, ok := endOf(r, req.Topic)
	if !ok {
		t.Fatalf("resume of %s since %d sent no end", req.Topic, req.Since)
	}
	return r, res
}

// testTruncation: a resume from a message the history no longer keeps is
// not recovered; one from a kept message is, with exactly what followed.
func testTruncation(t *testing.T, b Backend) {
	d := b.New(t, Options{MaxPerTopic: 5})
	n := node(t, d.Instance(t), all)
	ctx := ctxFor(t, 30*time.Second)
	const topic = "feed:trunc"
	ss := publishN(t, ctx, n, topic, 20)
	h := d.Instance(t).History

	rng, err := h.Since(ctx, topic, ss[2], 0)
	if err != nil {
		t.Fatal(err)
	}
	if rng.Complete || !slices.Equal(seqsOf(rng), ss[15:]) {
		t.Fatalf("Since(#3) = complete %v, %v; want incomplete, the last five %v", rng.Complete, seqsOf(rng), ss[15:])
	}
	rng, err = h.Since(ctx, topic, ss[15], 0)
	if err != nil {
		t.Fatal(err)
	}
	if !rng.Complete || !slices.Equal(seqsOf(rng), ss[16:]) {
		t.Fatalf("Since(#16) = complete %v, %v; want complete, %v", rng.Complete, seqsOf(rng), ss[16:])
	}
	rng, err = h.Since(ctx, topic, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !rng.Complete || !slices.Equal(seqsOf(rng), ss[15:]) {
		t.Fatalf("Since(0) = complete %v, %v; want complete (a reader with nothing loses nothing), %v", rng.Complete, seqsOf(rng), ss[15:])
	}

	r, res := resumeNow(t, ctx, n, fabric.ResumeRequest{Topic: topic, Since: ss[2], Subscribe: true})
	if res.Recovered {
		t.Fatalf("resume from a dropped message: end %+v, want recovered false", res)
	}
	if got := seqs(r.on(topic)); !slices.Equal(got, ss[15:]) {
		t.Fatalf("resume from a dropped message sent %v, want what is kept %v", got, ss[15:])
	}
	r, res = resumeNow(t, ctx, n, fabric.ResumeRequest{Topic: topic, Since: ss[15]})
	if !res.Recovered || res.Seq != ss[19] {
		t.Fatalf("replay from a kept message: end %+v, want recovered at %d", res, ss[19])
	}
	if got, _ := view(r, topic, false); !slices.Equal(got, ss[16:]) {
		t.Fatalf("replay from a kept message sent %v, want %v", got, ss[16:])
	}
}

func seqsOf(r fabric.Range) []uint64 {
	out := make([]uint64, len(r.Messages))
	for i, m := range r.Messages {
		out[i] = m.Seq
	}
	return out
}

// testEpoch: after the history is wiped, a resume from the old epoch is not
// recovered and gets the new epoch and what the new history holds.
func testEpoch(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	n := node(t, d.Instance(t), all)
	ctx := ctxFor(t, 30*time.Second)
	const topic = "feed:epoch"
	old := publishN(t, ctx, n, topic, 3)
	e1, err := n.History().Epoch(ctx, topic)
	if err != nil || e1 == "" {
		t.Fatalf("Epoch = %q, %v", e1, err)
	}
	if _, res := resumeNow(t, ctx, n, fabric.ResumeRequest{Topic: topic, Since: old[1], Epoch: e1, Subscribe: true}); !res.Recovered || res.Epoch != e1 {
		t.Fatalf("same-epoch resume: %+v, want recovered in %s", res, e1)
	}
	d.WipeHistory(t)
	var fresh []uint64
	waitFor(t, 20*time.Second, "a publish after the wipe", func() bool {
		seq, err := n.Publish(ctx, topic, "m", "new")
		if err != nil {
			return false // the store may be coming back
		}
		fresh = append(fresh, seq)
		return true
	})
	fresh = append(fresh, publishN(t, ctx, n, topic, 1)...)
	var e2 string
	waitFor(t, 5*time.Second, "the new epoch", func() bool {
		e2, err = n.History().Epoch(ctx, topic)
		return err == nil && e2 != e1
	})
	r, res := resumeNow(t, ctx, n, fabric.ResumeRequest{Topic: topic, Since: old[2], Epoch: e1, Subscribe: true})
	if res.Recovered || res.Epoch != e2 {
		t.Fatalf("old-epoch resume: end %+v, want recovered false in the new epoch %s", res, e2)
	}
	if got := seqs(r.on(topic)); !slices.Equal(got, fresh) {
		t.Fatalf("old-epoch resume sent %v, want the new history %v", got, fresh)
	}
}

// testHistoryReads: limits, More, Last, envelopes as published.
func testHistoryReads(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	n := node(t, d.Instance(t), all)
	h := n.History()
	ctx := ctxFor(t, 30*time.Second)
	const topic = "feed:reads"
	ss := publishN(t, ctx, n, topic, 10)
	for i := 1; i < len(ss); i++ {
		if ss[i] <= ss[i-1] {
			t.Fatalf("seqs not increasing: %v", ss)
		}
	}
	rng, err := h.Since(ctx, topic, 0, 4)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqsOf(rng), ss[:4]) || !rng.More || !rng.Complete {
		t.Fatalf("Since(0, 4) = %v more=%v complete=%v, want %v more complete", seqsOf(rng), rng.More, rng.Complete, ss[:4])
	}
	if want := string(fabric.Envelope(topic, "m", []byte("0"))); string(rng.Messages[0].Envelope) != want {
		t.Fatalf("stored envelope %s, want %s", rng.Messages[0].Envelope, want)
	}
	rng, err = h.Since(ctx, topic, ss[3], 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqsOf(rng), ss[4:]) || rng.More || !rng.Complete {
		t.Fatalf("Since(#4) = %v more=%v, want %v", seqsOf(rng), rng.More, ss[4:])
	}
	rng, err = h.Since(ctx, topic, ss[9], 0)
	if err != nil || len(rng.Messages) != 0 || !rng.Complete {
		t.Fatalf("Since(last) = %v %+v, want nothing, complete", err, rng)
	}
	last, err := h.Last(ctx, topic)
	if err != nil || last.Seq != ss[9] || last.Epoch == "" {
		t.Fatalf("Last = %+v, %v; want %d with an epoch", last, err, ss[9])
	}
	if seq, err := n.Seq(ctx, "feed:never"); err != nil || seq != 0 {
		t.Fatalf("Seq of a topic without messages = %d, %v", seq, err)
	}
	if rng, err := h.Since(ctx, "feed:never", 0, 0); err != nil || len(rng.Messages) != 0 || !rng.Complete {
		t.Fatalf("Since of a topic without messages = %+v, %v", rng, err)
	}
	// Another topic's sequences are not this one's.
	publishN(t, ctx, n, "feed:other", 3)
	rng, err = h.Since(ctx, topic, ss[9], 0)
	if err != nil || len(rng.Messages) != 0 {
		t.Fatalf("another topic's messages showed up: %+v, %v", rng, err)
	}
}

// testIdempotentAppend: a publish retried with the same message id stores
// and delivers once and returns the first seq; the id is per topic.
func testIdempotentAppend(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	n := node(t, d.Instance(t), all)
	ctx := ctxFor(t, 30*time.Second)
	r := newRecorder()
	if err := n.Subscribe(n.Connect(r, nil, "test"), "feed:idem"); err != nil {
		t.Fatal(err)
	}
	first, err := n.Publish(ctx, "feed:idem", "m", 1, fabric.MsgID("row-1"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := n.Publish(ctx, "feed:idem", "m", 1, fabric.MsgID("row-1"))
	if err != nil || again != first {
		t.Fatalf("retry with the same id: seq %d, %v; want the first seq %d", again, err, first)
	}
	other, err := n.Publish(ctx, "feed:idem", "m", 2, fabric.MsgID("row-2"))
	if err != nil || other <= first {
		t.Fatalf("a new id: seq %d, %v; want a new seq after %d", other, err, first)
	}
	elsewhere, err := n.Publish(ctx, "feed:other", "m", 1, fabric.MsgID("row-1"))
	if err != nil || elsewhere == 0 {
		t.Fatalf("the same id on another topic: seq %d, %v; want it stored", elsewhere, err)
	}
	rng, err := n.History().Since(ctx, "feed:idem", 0, 0)
	if err != nil || !slices.Equal(seqsOf(rng), []uint64{first, other}) {
		t.Fatalf("history %v, %v; want exactly %v", seqsOf(rng), err, []uint64{first, other})
	}
	got := r.waitOn(t, 10*time.Second, "feed:idem", "two messages", func(ms []received) bool { return len(ms) >= 2 })
	if !slices.Equal(seqs(got), []uint64{first, other}) {
		t.Fatalf("delivered %v, want %v once each", seqs(got), []uint64{first, other})
	}
}
