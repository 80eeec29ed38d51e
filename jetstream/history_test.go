package jetstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats-server/v2/server"
	dto "github.com/prometheus/client_model/go"
)

// withHistory returns fabrictest options whose node keeps the history of
// topics matching patterns, with o's other settings.
func withHistory(base fabrictest.Options, o jetstream.HistoryOptions, persistent ...string) fabrictest.Options {
	if len(persistent) > 0 {
		base.Node.Persistent = fabric.MatchTopics(persistent)
	}
	base.History = func(inst *fabrictest.Instance) (fabric.History, error) {
		ho := o
		ho.Prefix = inst.Broker.Prefix()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		h, err := jetstream.NewHistory(ctx, inst.JS, ho)
		if err != nil {
			return nil, err
		}
		inst.T.Cleanup(func() { _ = h.Close() })
		return h, nil
	}
	return base
}

// replayMsgData is the data of a "msg" event on __replay:T.
type replayMsgData struct {
	Seq   uint64          `json:"seq"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}

// endData is the data of an "end" event on __replay:T.
type endData struct {
	Seq       uint64 `json:"seq"`
	Epoch     string `json:"epoch"`
	Recovered bool   `json:"recovered"`
}

// reader follows one topic on one client the way the npm replay client
// does: live messages are dropped while a replay is running, replayed ones
// are taken from "msg" events, and everything after "end" is live.
type reader struct {
	t     testing.TB
	c     *wsclient.Client
	topic string
	seqs  []uint64
	end   *endData
}

// next consumes one event; it reports false on timeout.
func (r *reader) next(ctx context.Context, replaying bool) bool {
	ev, err := r.c.Next(ctx)
	if err != nil {
		return false
	}
	switch {
	case ev.Topic == r.topic:
		if replaying {
			return true // the npm client drops live messages until "end"
		}
		if ev.Seq == 0 {
			r.t.Errorf("live message without seq: %+v", ev)
		}
		r.seqs = append(r.seqs, ev.Seq)
	case ev.Topic == fabric.ReplayTopicPrefix+r.topic && ev.Event == "msg":
		var d replayMsgData
		if err := json.Unmarshal(ev.Data, &d); err != nil {
			r.t.Errorf("bad msg data %s: %v", ev.Data, err)
		}
		r.seqs = append(r.seqs, d.Seq)
	case ev.Topic == fabric.ReplayTopicPrefix+r.topic && ev.Event == "end":
		var d endData
		if err := json.Unmarshal(ev.Data, &d); err != nil {
			r.t.Errorf("bad end data %s: %v", ev.Data, err)
		}
		r.end = &d
	default:
		r.t.Errorf("unexpected event %+v", ev)
	}
	return true
}

// until reads until the last sequence seen is last and the resume's "end"
// has arrived; with dropLive, live messages before "end" are dropped.
func (r *reader) until(ctx context.Context, last uint64, dropLive bool) error {
	for {
		if lastOf(r.seqs) >= last && r.end != nil {
			return nil
		}
		if !r.next(ctx, dropLive && r.end == nil) {
			return fmt.Errorf("timed out with %d messages, last %v, end %+v", len(r.seqs), lastOf(r.seqs), r.end)
		}
	}
}

func lastOf(s []uint64) uint64 {
	if len(s) == 0 {
		return 0
	}
	return s[len(s)-1]
}

// after returns the elements of sorted seqs greater than since.
func after(seqs []uint64, since uint64) []uint64 {
	i, _ := slices.BinarySearch(seqs, since+1)
	return seqs[i:]
}

// TestResumeAcrossInstances: 1,000 messages published from two instances to
// one topic; 50 clients on the first instance each drop at a random point
// and resume on the other instance with the last sequence they saw (half
// with subscribe+since, half with the npm client's replay request), while
// publishing goes on. Each must end up with every message exactly once, in
// order.
func TestResumeAcrossInstances(t *testing.T) {
	t.Run("R1", func(t *testing.T) { testResumeAcrossInstances(t, 1, 0) })
	// Replicated, every resume read from the store: reads may be answered
	// by a follower (see History.Since).
	t.Run("R3-store", func(t *testing.T) { testResumeAcrossInstances(t, 3, -1) })
}

func testResumeAcrossInstances(t *testing.T, replicas, cache int) {
	insts := fabrictest.Cluster(t, 3, withHistory(fabrictest.Options{Node: fabric.Config{ReplayCache: cache}},
		jetstream.HistoryOptions{Eager: true, MaxPerTopic: 2000, Replicas: replicas}, "chat:*"))
	a, b := insts[0], insts[1]
	const topic, total, clients = "chat:resume", 1000, 50
	ctx := testCtx(t, 120*time.Second)

	type result struct {
		seqs []uint64
		cut  int
		mode string
		err  error
	}
	results := make([]result, clients)
	var ready, wg sync.WaitGroup
	published := make(chan uint64, total)
	var pubMu sync.Mutex
	var all []uint64
	lastSeq := make(chan uint64, 1)
	for i := range clients {
		ready.Add(1)
		wg.Add(1)
		cut := 1 + rand.IntN(total-2)
		mode := "subscribe-since"
		if i%2 == 1 {
			mode = "replay"
		}
		results[i] = result{cut: cut, mode: mode}
		c := a.Dial(wsclient.Options{Buffer: 4096})
		if err := c.Subscribe(ctx, topic); err != nil {
			t.Fatal(err)
		}
		go func() {
			defer wg.Done()
			r := &reader{t: t, c: c, topic: topic}
			ready.Done()
			for len(r.seqs) < cut {
				if !r.next(ctx, false) {
					results[i].err = errors.New("timed out before the cut")
					return
				}
			}
			c.Drop() // vanish mid-stream, with messages still in flight
			since := lastOf(r.seqs)
			c2, err := wsclient.Dial(ctx, b.WSURL, wsclient.Options{Buffer: 4096})
			if err != nil {
				results[i].err = err
				return
			}
			defer c2.Close()
			r.c = c2
			if mode == "replay" {
				err = c2.Subscribe(ctx, topic)
				if err == nil {
					err = c2.Replay(topic, since)
				}
			} else {
				err = c2.SubscribeSince(ctx, topic, since)
			}
			if err != nil {
				results[i].err = err
				return
			}
			last := <-lastSeq
			lastSeq <- last
			if err := r.until(ctx, last, mode == "replay"); err != nil {
				results[i].err = err
			}
			if r.end == nil || !r.end.Recovered {
				results[i].err = fmt.Errorf("end %+v, want recovered", r.end)
			}
			results[i].seqs = r.seqs
		}()
	}
	ready.Wait()
	go func() {
		for s := range published {
			pubMu.Lock()
			all = append(all, s)
			pubMu.Unlock()
		}
	}()
	var last uint64
	for i := range total {
		inst := a
		if i%2 == 1 {
			inst = b
		}
		seq, err := inst.Node.Publish(ctx, topic, "created", map[string]int{"n": i})
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		if seq <= last {
			t.Fatalf("publish %d: seq %d after %d", i, seq, last)
		}
		last = seq
		published <- seq
	}
	close(published)
	lastSeq <- last
	wg.Wait()
	// Resumes on b read the store until b has the topic's recent messages
	// (it has subscribers by then), then its cache.
	t.Logf("resumes on b: %v from the cache, %v from the store", resumes(b, "cache"), resumes(b, "store"))
	if got := resumes(b, "cache") + resumes(b, "store"); got != clients {
		t.Errorf("%v resumes counted on b, want %d", got, clients)
	}
	if cache < 0 && resumes(b, "cache") > 0 {
		t.Errorf("the cache answered while disabled")
	}
	pubMu.Lock()
	defer pubMu.Unlock()
	for i, r := range results {
		if r.err != nil {
			t.Errorf("client %d (%s, cut at %d): %v", i, r.mode, r.cut, r.err)
			continue
		}
		if !slices.Equal(r.seqs, all) {
			d := firstDiff(r.seqs, all)
			t.Errorf("client %d (%s, cut at %d): got %d messages, want %d; first difference at %d: got %v, want %v",
				i, r.mode, r.cut, len(r.seqs), len(all), d, around(r.seqs, d), around(all, d))
		}
	}
}

// resumes reads inst's fabric_resumes_total for source.
func resumes(inst *fabrictest.Instance, source string) float64 {
	var m dto.Metric
	if err := inst.Node.Metrics().Resumes.WithLabelValues(source).Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func around(s []uint64, i int) []uint64 {
	return s[max(0, i-3):min(len(s), i+3)]
}

func firstDiff(a, b []uint64) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestResumeAfterRestart: every instance of a cluster stops and starts again
// on the same data dirs; a resume is still exact and the epoch unchanged.
func TestResumeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	opts := withHistory(fabrictest.Options{Embed: embed.Options{DataDir: dir}, Prefix: fabrictest.TestPrefix(t)},
		jetstream.HistoryOptions{Eager: true}, "doc:*")
	ctx := testCtx(t, 180*time.Second)
	insts := fabrictest.Cluster(t, 3, opts)
	var seqs []uint64
	for i := range 100 {
		seq, err := insts[i%3].Node.Publish(ctx, "doc:1", "edit", i)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	epoch, err := insts[0].Node.History().Epoch(ctx, "doc:1")
	if err != nil || epoch == "" {
		t.Fatalf("epoch %q: %v", epoch, err)
	}
	for _, in := range insts {
		in.Stop()
	}

	insts = fabrictest.Cluster(t, 3, opts)
	for i := range 10 {
		var seq uint64
		fabrictest.WaitFor(t, 60*time.Second, "a publish after the restart", func() bool {
			seq, err = insts[i%3].Node.Publish(ctx, "doc:1", "edit", 100+i)
			return err == nil
		})
		seqs = append(seqs, seq)
	}
	if !slices.IsSorted(seqs) {
		t.Fatalf("sequences went back after the restart: %v", seqs[95:])
	}
	if got, err := insts[1].Node.Seq(ctx, "doc:1"); err != nil || got != seqs[len(seqs)-1] {
		t.Fatalf("Seq = %d, %v; want %d", got, err, seqs[len(seqs)-1])
	}
	c := insts[2].Dial(wsclient.Options{})
	if err := c.Replay("doc:1", seqs[49]); err != nil {
		t.Fatal(err)
	}
	r := &reader{t: t, c: c, topic: "doc:1"}
	if err := r.until(ctx, seqs[len(seqs)-1], true); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.seqs, seqs[50:]) {
		t.Fatalf("replayed %v, want %v", r.seqs, seqs[50:])
	}
	if !r.end.Recovered || r.end.Epoch != epoch || r.end.Seq != seqs[len(seqs)-1] {
		t.Fatalf("end %+v; want recovered, epoch %s, seq %d", r.end, epoch, seqs[len(seqs)-1])
	}
}

// TestResumeTruncatedAndEpoch: a since older than the retained history is
// answered with what is left and recovered:false; a recreated stream is a
// new epoch, and a since from the old one is reported, not misread.
func TestResumeTruncatedAndEpoch(t *testing.T) {
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{}, jetstream.HistoryOptions{Eager: true, MaxPerTopic: 5}, "t:*"))
	ctx := testCtx(t, 60*time.Second)
	var seqs []uint64
	for i := range 10 {
		seq, err := inst.Node.Publish(ctx, "t:1", "n", i)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
		if _, err := inst.Node.Publish(ctx, "t:2", "n", i); err != nil { // interleave another topic
			t.Fatal(err)
		}
	}
	check := func(since uint64, epoch string, want []uint64, recovered bool) endData {
		t.Helper()
		c := inst.Dial(wsclient.Options{})
		msg := map[string]any{"type": "replay", "topic": "t:1", "since": since}
		if epoch != "" {
			msg["epoch"] = epoch
		}
		if err := c.Send(msg); err != nil {
			t.Fatal(err)
		}
		r := &reader{t: t, c: c, topic: "t:1"}
		for r.end == nil {
			if !r.next(ctx, true) {
				t.Fatalf("no end for since %d", since)
			}
		}
		if !slices.Equal(r.seqs, want) || r.end.Recovered != recovered {
			t.Fatalf("since %d epoch %q: got %v, end %+v; want %v recovered=%v", since, epoch, r.seqs, r.end, want, recovered)
		}
		c.Close()
		return *r.end
	}
	end := check(seqs[1], "", seqs[5:], false) // 2..4 were dropped
	epoch := end.Epoch
	check(seqs[5], epoch, seqs[6:], true)
	check(seqs[9], epoch, nil, true)
	check(0, "", seqs[5:], true)

	rng, err := inst.Node.Since(ctx, "t:1", seqs[5], 2)
	if err != nil || !rng.Complete || !rng.More || len(rng.Messages) != 2 || rng.Messages[0].Seq != seqs[6] {
		t.Fatalf("Since(limit 2) = %+v, %v", rng, err)
	}

	// Recreate the topic's partition stream: a new epoch; old sequences are
	// reported stale.
	if err := inst.JS.DeleteStream(ctx, inst.Node.History().(*jetstream.History).StreamOf("t:1")); err != nil {
		t.Fatal(err)
	}
	seq, err := inst.Node.Publish(ctx, "t:1", "n", "fresh")
	if err != nil {
		t.Fatalf("publish after the stream was deleted: %v", err)
	}
	end = check(seqs[9], epoch, []uint64{seq}, false)
	if end.Epoch == epoch || end.Epoch == "" {
		t.Fatalf("epoch after recreation %q, before %q", end.Epoch, epoch)
	}
	check(seqs[9], "", nil, false) // no epoch sent: the since is unknown, nothing after it
	check(seq, end.Epoch, nil, true)
}

// TestResumeSeam: 20 clients resume with subscribe+since while publishers
// run at full speed; each sees every later message once, in order.
func TestResumeSeam(t *testing.T) {
	t.Run("cache", func(t *testing.T) { testResumeSeam(t, 0, 0) })
	t.Run("store", func(t *testing.T) { testResumeSeam(t, -1, 0) })
	// A hold of 2 messages overflows during the reads: the resumes read the
	// history again instead of keeping what they held.
	t.Run("store-overflow", func(t *testing.T) { testResumeSeam(t, -1, 2) })
}

func testResumeSeam(t *testing.T, cache, hold int) {
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{Node: fabric.Config{ReplayCache: cache, ResumeHold: hold}},
		jetstream.HistoryOptions{Eager: true, MaxPerTopic: 100000}, "*"))
	ctx := testCtx(t, 120*time.Second)
	const topic, publishers, perPublisher, clients = "seam", 4, 1000, 20
	var mu sync.Mutex
	var all []uint64
	var pubs sync.WaitGroup
	for p := range publishers {
		pubs.Go(func() {
			for i := range perPublisher {
				seq, err := inst.Node.Publish(ctx, topic, "n", p*perPublisher+i)
				if err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				mu.Lock()
				all = append(all, seq)
				mu.Unlock()
			}
		})
	}
	type result struct {
		since uint64
		seqs  []uint64
		err   error
	}
	results := make([]result, clients)
	var wg sync.WaitGroup
	done := make(chan uint64)
	for i := range clients {
		// Resume at staggered moments while the publishers run.
		time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
		mu.Lock()
		var since uint64
		if len(all) > 0 {
			since = slices.Max(all[:1+rand.IntN(len(all))])
		}
		mu.Unlock()
		c := inst.Dial(wsclient.Options{Buffer: 8192})
		results[i].since = since
		wg.Go(func() {
			if err := c.SubscribeSince(ctx, topic, since); err != nil {
				results[i].err = err
				return
			}
			r := &reader{t: t, c: c, topic: topic}
			last := <-done
			results[i].err = r.until(ctx, last, false)
			results[i].seqs = r.seqs
		})
	}
	pubs.Wait()
	mu.Lock()
	slices.Sort(all)
	mu.Unlock()
	last := all[len(all)-1]
	for range clients {
		done <- last
	}
	wg.Wait()
	if cache < 0 && resumes(inst, "cache") > 0 {
		t.Errorf("the cache answered resumes while disabled")
	}
	var rereads dto.Metric
	_ = inst.Node.Metrics().ResumeRereads.Write(&rereads)
	t.Logf("resumes from the cache: %v, from the store: %v; history re-read %v times", resumes(inst, "cache"), resumes(inst, "store"), rereads.GetCounter().GetValue())
	if hold > 0 && rereads.GetCounter().GetValue() == 0 {
		t.Errorf("the hold of %d never overflowed", hold)
	}
	for i, r := range results {
		want := after(all, r.since)
		if r.err != nil {
			t.Errorf("client %d since %d: %v", i, r.since, r.err)
		} else if !slices.Equal(r.seqs, want) {
			t.Errorf("client %d since %d: got %d messages, want %d; first difference at %d",
				i, r.since, len(r.seqs), len(want), firstDiff(r.seqs, want))
		}
	}
}

// TestPersistOption: Persist() keeps a message of a topic outside the
// patterns; Publish returns its seq; live subscribers see the seq.
func TestPersistOption(t *testing.T) {
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{}, jetstream.HistoryOptions{}))
	ctx := testCtx(t, 30*time.Second)
	c := inst.Dial(wsclient.Options{})
	if err := c.Subscribe(ctx, "misc"); err != nil {
		t.Fatal(err)
	}
	seq0, err := inst.Node.Publish(ctx, "misc", "plain", 1)
	if err != nil || seq0 != 0 {
		t.Fatalf("plain publish: seq %d, %v", seq0, err)
	}
	seq, err := inst.Node.Publish(ctx, "misc", "kept", 2, fabric.Persist())
	if err != nil || seq == 0 {
		t.Fatalf("persisted publish: seq %d, %v", seq, err)
	}
	for _, want := range []struct {
		event string
		seq   uint64
	}{{"plain", 0}, {"kept", seq}} {
		ev, err := c.Next(ctx)
		if err != nil || ev.Event != want.event || ev.Seq != want.seq {
			t.Fatalf("got %+v, %v; want event %s seq %d", ev, err, want.event, want.seq)
		}
	}
	if got, _ := inst.Node.Seq(ctx, "misc"); got != seq {
		t.Fatalf("Seq = %d, want %d", got, seq)
	}
	if got, _ := inst.Node.Seq(ctx, "never"); got != 0 {
		t.Fatalf("Seq of an empty topic = %d", got)
	}
}

// cutProxy forwards TCP connections to target until cut closes them all.
type cutProxy struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(u, c); u.Close() }()
			go func() { _, _ = io.Copy(c, u); c.Close() }()
		}
	}()
	return p
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestClientReconnectResumes: the Go client's Reconnect resumes a
// persistent topic from the last seq it saw, across a cut connection, with
// messages published while it was away.
func TestClientReconnectResumes(t *testing.T) {
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{}, jetstream.HistoryOptions{Eager: true}, "feed"))
	ctx := testCtx(t, 60*time.Second)
	proxy := newCutProxy(t, strings.TrimPrefix(inst.HTTP.URL, "http://"))
	c, err := wsclient.Dial(ctx, "ws://"+proxy.ln.Addr().String()+"/ws", wsclient.Options{
		Reconnect: true, MinBackoff: 20 * time.Millisecond,
		Header: http.Header{"Origin": []string{"http://" + proxy.ln.Addr().String()}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe(ctx, "feed"); err != nil {
		t.Fatal(err)
	}
	var want []uint64
	pub := func(n int) {
		for range n {
			seq, err := inst.Node.Publish(ctx, "feed", "n", len(want))
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, seq)
		}
	}
	r := &reader{t: t, c: c, topic: "feed"}
	pub(3)
	for len(r.seqs) < 3 {
		if !r.next(ctx, false) {
			t.Fatal("timed out")
		}
	}
	proxy.cut()
	fabrictest.WaitFor(t, 10*time.Second, "the server to see the cut", func() bool { return inst.Node.Connections() == 0 })
	pub(5) // while the client is away
	if err := r.until(ctx, want[len(want)-1], false); err != nil {
		t.Fatal(err)
	}
	pub(2) // live again
	if err := r.until(ctx, want[len(want)-1], false); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.seqs, want) || !r.end.Recovered {
		t.Fatalf("got %v (end %+v), want %v", r.seqs, r.end, want)
	}
}

// TestHistoryWithoutJetStream: against a NATS server without JetStream,
// persistent patterns fail at once with the reason; without patterns the
// history costs nothing until a Persist() publish, which then fails with it.
func TestHistoryWithoutJetStream(t *testing.T) {
	srv := fabrictest.StartNATS(t, func(o *server.Options) { o.JetStream = false })
	ctx := testCtx(t, 30*time.Second)
	inst := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: srv.ClientURL()})
	t0 := time.Now()
	_, err := jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{Eager: true})
	if err == nil || !strings.Contains(err.Error(), "not enabled") || time.Since(t0) > 2*time.Second {
		t.Fatalf("NewHistory (eager): %v after %s; want a prompt 'not enabled' error", err, time.Since(t0))
	}
	h, err := jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{})
	if err != nil {
		t.Fatalf("NewHistory (lazy): %v", err)
	}
	defer h.Close()
	if _, err := h.Append(ctx, "misc", fabric.Envelope("misc", "e", []byte("1")), ""); err == nil || !strings.Contains(err.Error(), "not enabled") {
		t.Fatalf("Append: %v; want 'not enabled'", err)
	}
}

// TestHistoryReplicasOnStandalone: replicas > 1 on a server that is not
// clustered is refused at once, with the server's reason.
func TestHistoryReplicasOnStandalone(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	ctx := testCtx(t, 30*time.Second)
	t0 := time.Now()
	_, err := jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{Prefix: inst.Broker.Prefix(), Eager: true, Replicas: 3})
	if err == nil || !strings.Contains(err.Error(), "replicas") || time.Since(t0) > time.Second {
		t.Fatalf("NewHistory R3 standalone: %v after %s; want a prompt error about replicas", err, time.Since(t0))
	}
	// Created on first use: the refusal is not "try again later".
	h, err := jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{Prefix: inst.Broker.Prefix(), Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	t0 = time.Now()
	_, err = h.Append(ctx, "misc", fabric.Envelope("misc", "e", []byte("1")), "")
	if err == nil || !strings.Contains(err.Error(), "replicas") || errors.Is(err, fabric.ErrBackendUnavailable) || time.Since(t0) > time.Second {
		t.Fatalf("Append R3 standalone: %v after %s; want a prompt refusal about replicas, not ErrBackendUnavailable", err, time.Since(t0))
	}
}

// TestHistoryConcurrentReads: 200 concurrent Since reads of 20 topics, with
// pages cut small by PageMaxBytes, each return exactly the topic's
// messages after its since, while reads abandoned by their context run
// among them; the History reads through one shared reply subscription
// (the connection's subscription count never moves) and nothing stays
// registered afterwards.
func TestHistoryConcurrentReads(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{})
	ctx := testCtx(t, 120*time.Second)
	h, err := jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{
		Prefix: inst.Broker.Prefix(), Eager: true, MaxPerTopic: 1000, PageMaxBytes: 2048,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	const topics, perTopic, readers, abandoned = 20, 300, 200, 200
	topic := func(i int) string { return fmt.Sprintf("room:%d", i) }
	stored := make([][]fabric.Stored, topics)
	var pubs sync.WaitGroup
	for i := range topics {
		pubs.Go(func() {
			for n := range perTopic {
				env := fabric.Envelope(topic(i), "n", fmt.Appendf(nil, `{"topic":%d,"n":%d}`, i, n))
				pos, err := h.Append(ctx, topic(i), env, "")
				if err != nil {
					t.Errorf("append: %v", err)
					return
				}
				stored[i] = append(stored[i], fabric.Stored{Seq: pos.Seq, Envelope: env})
			}
		})
	}
	pubs.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for i := range topics { // warm up: epochs read, nats.go's request inbox made
		if _, err := h.Since(ctx, topic(i), 0, 1); err != nil {
			t.Fatal(err)
		}
	}

	subs := inst.NC.NumSubscriptions()
	var maxSubs atomic.Int64
	maxSubs.Store(int64(subs))
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		for {
			if n := int64(inst.NC.NumSubscriptions()); n > maxSubs.Load() {
				maxSubs.Store(n)
			}
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Microsecond): // sampling, not waiting for a result
			}
		}
	})
	var wg sync.WaitGroup
	for r := range readers {
		wg.Go(func() {
			i := r % topics
			k := rand.IntN(perTopic + 1) // resume after stored[i][k-1]; k = 0: from nothing
			var since uint64
			if k > 0 {
				since = stored[i][k-1].Seq
			}
			limit := 0
			if r%5 == 0 {
				limit = 1 + rand.IntN(100)
			}
			rng, err := h.Since(ctx, topic(i), since, limit)
			if err != nil {
				t.Errorf("reader %d: Since(%s, %d, %d): %v", r, topic(i), since, limit, err)
				return
			}
			want := stored[i][k:]
			more := false
			if limit > 0 && len(want) > limit {
				want, more = want[:limit], true
			}
			if !rng.Complete || rng.More != more || len(rng.Messages) != len(want) {
				t.Errorf("reader %d: Since(%s, %d, %d): %d messages, complete %v, more %v; want %d, true, %v",
					r, topic(i), since, limit, len(rng.Messages), rng.Complete, rng.More, len(want), more)
				return
			}
			for j, m := range rng.Messages {
				if m.Seq != want[j].Seq || string(m.Envelope) != string(want[j].Envelope) {
					t.Errorf("reader %d: message %d is %d %s, want %d %s", r, j, m.Seq, m.Envelope, want[j].Seq, want[j].Envelope)
					return
				}
			}
		})
	}
	for a := range abandoned {
		wg.Go(func() {
			actx, cancel := context.WithTimeout(ctx, time.Duration(rand.IntN(2000))*time.Microsecond)
			defer cancel()
			_, _ = h.Since(actx, topic(a%topics), 0, 0) // late answers must reach no other read
		})
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	if got := maxSubs.Load(); got != int64(subs) {
		t.Errorf("%d subscriptions during the reads, %d before: a subscription per read", got, subs)
	}
	if n := h.BatchesInFlight(); n != 0 {
		t.Errorf("%d reads still registered after every read returned", n)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if got := inst.NC.NumSubscriptions(); got != subs-1 {
		t.Errorf("%d subscriptions after Close, want %d", got, subs-1)
	}
	if _, err := h.Since(ctx, topic(0), 0, 0); err == nil {
		t.Errorf("Since after Close succeeded")
	}
}

// recorder is a fabric.Receiver that keeps the seq and prev of each message.
type recorder struct {
	mu   sync.Mutex
	got  [][2]uint64
	seen atomic.Int64
}

func (r *recorder) Receive(_ []byte, seq, prev uint64) {
	r.mu.Lock()
	r.got = append(r.got, [2]uint64{seq, prev})
	r.mu.Unlock()
	r.seen.Add(1)
}

// TestHistoryPartitions: topics spread over the partition streams by a
// hash; each message is stored on its topic's subject in its partition and
// republished to the topic's subscribers with its seq and the topic's
// previous seq as prev; a deleted partition is recreated on Append with a
// new epoch for its topics only.
func TestHistoryPartitions(t *testing.T) {
	const parts = 4
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{}, jetstream.HistoryOptions{Eager: true, Partitions: parts}, "*"))
	ctx := testCtx(t, 60*time.Second)
	h := inst.Node.History().(*jetstream.History)
	streams := h.Streams()
	if len(streams) != parts {
		t.Fatalf("streams %v, want %d", streams, parts)
	}
	for _, name := range streams { // Eager created them all
		if _, err := inst.JS.Stream(ctx, name); err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
	}
	byStream := map[string]string{}
	var topics []string
	for i := 0; len(byStream) < parts; i++ {
		if i > 1000 {
			t.Fatalf("1000 topics hash to %d partitions only", len(byStream))
		}
		topic := fmt.Sprintf("room:%d", i)
		if _, ok := byStream[h.StreamOf(topic)]; !ok {
			byStream[h.StreamOf(topic)] = topic
			topics = append(topics, topic)
		}
	}
	recs := map[string]*recorder{}
	for _, topic := range topics {
		recs[topic] = &recorder{}
		sub, err := inst.Broker.Subscribe(topic, recs[topic])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := inst.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	const rounds = 3
	seqs := map[string][]uint64{}
	for n := range rounds {
		for _, topic := range topics {
			seq, err := inst.Node.Publish(ctx, topic, "n", n)
			if err != nil {
				t.Fatal(err)
			}
			seqs[topic] = append(seqs[topic], seq)
		}
	}
	for _, topic := range topics {
		r := recs[topic]
		fabrictest.WaitFor(t, 10*time.Second, "republished messages of "+topic, func() bool { return r.seen.Load() >= rounds })
		r.mu.Lock()
		var prev uint64
		for i, sp := range r.got {
			if want := [2]uint64{seqs[topic][i], prev}; sp != want {
				t.Errorf("%s message %d: seq/prev %v, want %v", topic, i, sp, want)
			}
			prev = sp[0]
		}
		r.mu.Unlock()
		s, err := inst.JS.Stream(ctx, h.StreamOf(topic))
		if err != nil {
			t.Fatal(err)
		}
		m, err := s.GetMsg(ctx, seqs[topic][0])
		if err != nil || m.Subject != h.SubjectOf(topic) {
			t.Fatalf("message %d of %s in %s: %+v, %v; want it on %s", seqs[topic][0], topic, h.StreamOf(topic), m, err, h.SubjectOf(topic))
		}
	}

	epochs := map[string]string{}
	for _, topic := range topics {
		e, err := h.Epoch(ctx, topic)
		if err != nil || e == "" {
			t.Fatalf("epoch of %s: %q, %v", topic, e, err)
		}
		epochs[topic] = e
	}
	gone := topics[0]
	if err := inst.JS.DeleteStream(ctx, h.StreamOf(gone)); err != nil {
		t.Fatal(err)
	}
	for _, topic := range topics {
		if _, err := inst.Node.Publish(ctx, topic, "n", "after"); err != nil {
			t.Fatalf("publish to %s after %s was deleted: %v", topic, h.StreamOf(gone), err)
		}
		e, err := h.Epoch(ctx, topic)
		if err != nil {
			t.Fatal(err)
		}
		if changed := e != epochs[topic]; changed != (topic == gone) {
			t.Errorf("epoch of %s (%s): %q, before %q", topic, h.StreamOf(topic), e, epochs[topic])
		}
	}
}

// TestHistoryUnavailable: when JetStream goes away (its server is shut
// down, or JetStream alone is), a persistent publish without a deadline
// fails with fabric.ErrBackendUnavailable within the node's PublishTimeout,
// and so does an Append whose context ends, or that meets no JetStream.
func TestHistoryUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name string
		cut  func(*server.Server)
	}{
		{"server-down", func(s *server.Server) { s.Shutdown() }},
		{"jetstream-down", func(s *server.Server) { _ = s.ShutdownJetStream() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := fabrictest.StartNATS(t, nil)
			const timeout = time.Second
			inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{NATSURL: srv.ClientURL(), Node: fabric.Config{PublishTimeout: timeout}},
				jetstream.HistoryOptions{Eager: true}, "p:*"))
			if _, err := inst.Node.Publish(testCtx(t, 10*time.Second), "p:1", "e", 1); err != nil {
				t.Fatal(err)
			}
			tc.cut(srv)
			t0 := time.Now()
			_, err := inst.Node.Publish(context.Background(), "p:1", "e", 2)
			if took := time.Since(t0); !errors.Is(err, fabric.ErrBackendUnavailable) || took > timeout+time.Second {
				t.Fatalf("publish: %v after %s; want ErrBackendUnavailable within %s", err, took, timeout+time.Second)
			}
			t.Logf("publish: %v", err)
			actx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			t0 = time.Now()
			_, err = inst.Node.History().Append(actx, "p:2", fabric.Envelope("p:2", "e", []byte("3")), "")
			if took := time.Since(t0); !errors.Is(err, fabric.ErrBackendUnavailable) || took > timeout+500*time.Millisecond {
				t.Fatalf("append: %v after %s; want ErrBackendUnavailable within %s", err, took, timeout+500*time.Millisecond)
			}
		})
	}
}

// TestHistoryLeaderChange: reads of a replicated history on every instance
// stay exact and complete while the topic's stream changes leader (the
// leader checks a read makes wait out the election instead of failing).
func TestHistoryLeaderChange(t *testing.T) {
	insts := fabrictest.Cluster(t, 3, fabrictest.Options{})
	ctx := testCtx(t, 120*time.Second)
	hs := make([]*jetstream.History, len(insts))
	for i, in := range insts {
		h, err := jetstream.NewHistory(ctx, in.JS, jetstream.HistoryOptions{
			Prefix: insts[0].Broker.Prefix(), Eager: true, Replicas: 3, Partitions: 2, MaxPerTopic: 1000,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = h.Close() })
		hs[i] = h
	}
	const topic, total = "doc:leader", 200
	var seqs []uint64
	for i := range total {
		var pos fabric.Position
		fabrictest.WaitFor(t, 30*time.Second, "an append", func() bool {
			var err error
			pos, err = hs[i%3].Append(ctx, topic, fabric.Envelope(topic, "n", fmt.Appendf(nil, "%d", i)), "")
			return err == nil
		})
		seqs = append(seqs, pos.Seq)
	}
	stream := hs[0].StreamOf(topic)
	leader := func() string {
		// A request sent while the stream has no leader goes unanswered.
		ictx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		s, err := insts[0].JS.Stream(ictx, stream)
		if err != nil || s.CachedInfo().Cluster == nil {
			return ""
		}
		return s.CachedInfo().Cluster.Leader
	}

	stop := make(chan struct{})
	var reads, failures atomic.Int64
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	for i := range hs { // one reader per instance, paced so as not to starve the cluster
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				k := rand.IntN(total)
				rng, err := hs[i].Since(ctx, topic, seqs[k], 0)
				reads.Add(1)
				got := make([]uint64, len(rng.Messages))
				for j, m := range rng.Messages {
					got[j] = m.Seq
				}
				if err != nil || !rng.Complete || !slices.Equal(got, seqs[k+1:]) {
					failures.Add(1)
					t.Errorf("instance %d, since %d: %d messages, complete %v, %v", i, seqs[k], len(got), rng.Complete, err)
				}
			}
		})
	}
	for range 3 {
		before := leader()
		fabrictest.WaitFor(t, 30*time.Second, "a stream leader step-down", func() bool {
			m, err := insts[0].NC.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, nil, time.Second)
			return err == nil && strings.Contains(string(m.Data), `"success":true`)
		})
		fabrictest.WaitFor(t, 30*time.Second, "a new stream leader", func() bool {
			l := leader()
			return l != "" && l != before
		})
	}
	t.Logf("%d reads during 3 leader changes, %d failed", reads.Load(), failures.Load())
}
