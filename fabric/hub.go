package fabric

import (
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// hubShards spreads topics over independent locks.
const hubShards = 64

// hub holds the local subscribers of every topic and the one broker
// subscription per topic that feeds them.
type hub struct {
	node   *Node
	seed   maphash.Seed
	shards [hubShards]hubShard
	topics atomic.Int64 // topics with at least one local subscriber
	subs   atomic.Int64 // (client, topic) pairs
}

type hubShard struct {
	mu     sync.Mutex
	topics map[string]*topicState
}

// topicState is one topic's local subscriber set. Membership changes under
// the shard lock; deliveries read an immutable snapshot rebuilt lazily after
// a change, so a publish never takes a lock per subscriber and a burst of N
// subscribes costs O(N), not O(N²).
type topicState struct {
	hub   *hub
	topic string

	members []*Client       // guarded by shard.mu
	index   map[*Client]int // guarded by shard.mu
	stale   atomic.Bool
	snap    atomic.Pointer[[]*Client]
	removed atomic.Bool

	subMu sync.Mutex
	sub   Subscription

	tail atomic.Pointer[tail] // recent stored messages, once one arrives

	// recvMu is held while a message is delivered (the broker calls
	// Receive from one goroutine, so it is uncontended); barrier takes it
	// to wait out a delivery that began before a resume's hold.
	recvMu sync.Mutex
	// lastSeq is the stored sequence last delivered (guarded by recvMu).
	lastSeq uint64
	// repaired is when a gap was last read from the store (recvMu).
	repaired time.Time
}

// Gap repair: a stored message whose prev is past the last one delivered
// means the live feed lost the ones between (JetStream: a stream leader
// killed after storing a message and before its republish went out). Up to
// maxGapRepair of them are read from the store and delivered first, at
// most once per gapRepairEvery per topic (an instance that dropped a
// flood's messages on purpose must not turn each gap into a store read),
// within gapRepairTimeout.
const (
	maxGapRepair     = 64
	gapRepairEvery   = 250 * time.Millisecond
	gapRepairTimeout = 2 * time.Second
)

// dupWindow bounds how far behind the last delivered sequence a stored
// message is taken for a duplicate: a stream that was recreated starts
// again from 1, far behind.
const dupWindow = 1 << 16

func (h *hub) shard(topic string) *hubShard {
	return &h.shards[maphash.String(h.seed, topic)%hubShards]
}

// add makes c a local subscriber of topic and makes sure the broker feeds it.
func (h *hub) add(topic string, c *Client) error {
	s := h.shard(topic)
	s.mu.Lock()
	if s.topics == nil {
		s.topics = make(map[string]*topicState)
	}
	t := s.topics[topic]
	if t == nil {
		t = &topicState{hub: h, topic: topic, index: make(map[*Client]int)}
		s.topics[topic] = t
		h.topics.Add(1)
	}
	if _, dup := t.index[c]; !dup {
		t.index[c] = len(t.members)
		t.members = append(t.members, c)
		t.stale.Store(true)
		h.subs.Add(1)
	}
	s.mu.Unlock()
	if err := t.ensureSubscribed(); err != nil {
		h.remove(topic, c)
		return err
	}
	return nil
}

// remove drops c from topic; the last subscriber out stops the broker feed.
func (h *hub) remove(topic string, c *Client) {
	s := h.shard(topic)
	s.mu.Lock()
	t := s.topics[topic]
	if t == nil {
		s.mu.Unlock()
		return
	}
	i, ok := t.index[c]
	if !ok {
		s.mu.Unlock()
		return
	}
	last := len(t.members) - 1
	t.members[i] = t.members[last]
	t.index[t.members[i]] = i
	t.members[last] = nil
	t.members = t.members[:last]
	delete(t.index, c)
	t.stale.Store(true)
	h.subs.Add(-1)
	empty := len(t.members) == 0
	if empty {
		delete(s.topics, topic)
		t.removed.Store(true)
		h.topics.Add(-1)
	}
	s.mu.Unlock()
	if empty {
		t.stopFeed()
	}
}

// count returns the number of local subscribers of topic.
func (h *hub) count(topic string) int {
	s := h.shard(topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.topics[topic]; t != nil {
		return len(t.members)
	}
	return 0
}

// each calls fn with every topic that has local subscribers and its count.
func (h *hub) each(fn func(topic string, n int)) {
	type tc struct {
		t string
		n int
	}
	var buf []tc
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		buf = buf[:0]
		for name, t := range s.topics {
			buf = append(buf, tc{name, len(t.members)})
		}
		s.mu.Unlock()
		for _, x := range buf {
			fn(x.t, x.n)
		}
	}
}

// closeAll stops every broker feed.
func (h *hub) closeAll() {
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		ts := make([]*topicState, 0, len(s.topics))
		for _, t := range s.topics {
			t.removed.Store(true)
			ts = append(ts, t)
		}
		s.mu.Unlock()
		for _, t := range ts {
			t.stopFeed()
		}
	}
}

func (t *topicState) ensureSubscribed() error {
	t.subMu.Lock()
	defer t.subMu.Unlock()
	if t.sub != nil || t.removed.Load() {
		return nil
	}
	sub, err := t.hub.node.broker.Subscribe(t.topic, t)
	if err != nil {
		return err
	}
	t.sub = sub
	return nil
}

func (t *topicState) stopFeed() {
	t.subMu.Lock()
	sub := t.sub
	t.sub = nil
	t.subMu.Unlock()
	if sub != nil {
		if err := sub.Unsubscribe(); err != nil {
			t.hub.node.log.Debug("broker unsubscribe failed", "topic", t.topic, "err", err)
		}
	}
}

// snapshot returns the current subscribers; the slice must not be modified.
func (t *topicState) snapshot() []*Client {
	if t.stale.Load() {
		s := t.hub.shard(t.topic)
		s.mu.Lock()
		if t.stale.Load() {
			cp := make([]*Client, len(t.members))
			copy(cp, t.members)
			t.snap.Store(&cp)
			t.stale.Store(false)
		}
		s.mu.Unlock()
	}
	if p := t.snap.Load(); p != nil {
		return *p
	}
	return nil
}

// Receive implements Receiver: one envelope from the broker, framed once and
// handed to every local subscriber. Stored messages are also kept in the
// topic's tail for resumes.
func (t *topicState) Receive(envelope []byte, seq, prev uint64) {
	t.recvMu.Lock()
	defer t.recvMu.Unlock()
	subs := t.snapshot()
	if seq == 0 {
		if len(subs) > 0 {
			t.hub.node.deliver(NewMessage(t.topic, 0, envelope), subs)
		}
		return
	}
	// A stored message comes once per topic in sequence order, but a
	// backend may deliver one again: JetStream republishes what a new
	// stream leader applies, which the old leader may have republished
	// before it went. Drop what is at or behind the last delivered
	// sequence, unless it starts a topic's stream anew (prev 0: a
	// recreated stream) or its chain is unknown.
	if last := t.lastSeq; seq <= last && prev != 0 && prev != UnknownSeq && prev < seq && last-seq < dupWindow {
		t.hub.node.metrics.Duplicates.Inc()
		return
	}
	if last := t.lastSeq; last != 0 && prev != UnknownSeq && prev > last && prev-last < dupWindow<<8 {
		t.repair(last, prev, subs)
	}
	t.lastSeq = seq
	m := NewMessage(t.topic, seq, WithSeq(envelope, seq))
	if tl := t.tailCache(); tl != nil {
		tl.add(m, prev)
	}
	if len(subs) > 0 {
		t.hub.node.deliver(m, subs)
	}
}

// repair delivers the topic's stored messages after from up to to, which
// the live feed lost (see maxGapRepair); with recvMu held.
func (t *topicState) repair(from, to uint64, subs []*Client) {
	n := t.hub.node
	h := n.cfg.History
	if h == nil || time.Since(t.repaired) < gapRepairEvery {
		n.metrics.Gaps.WithLabelValues("skipped").Inc()
		return
	}
	t.repaired = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), gapRepairTimeout)
	defer cancel()
	r, err := h.Since(ctx, t.topic, from, maxGapRepair)
	if err != nil {
		n.metrics.Gaps.WithLabelValues("failed").Inc()
		n.log.Debug("live gap not repaired", "topic", t.topic, "after", from, "until", to, "err", err)
		return
	}
	tl := t.tailCache()
	prev := from
	for _, s := range r.Messages {
		if s.Seq > to {
			break
		}
		m := NewMessage(t.topic, s.Seq, WithSeq(s.Envelope, s.Seq))
		m.repaired = true
		if tl != nil {
			tl.add(m, prev)
		}
		if len(subs) > 0 {
			n.deliver(m, subs)
		}
		prev, t.lastSeq = s.Seq, s.Seq
	}
	if prev == to {
		n.metrics.Gaps.WithLabelValues("repaired").Inc()
	} else {
		n.metrics.Gaps.WithLabelValues("partial").Inc()
	}
}

// tailCache returns the topic's tail, creating it; nil when disabled.
func (t *topicState) tailCache() *tail {
	if tl := t.tail.Load(); tl != nil {
		return tl
	}
	n := t.hub.node.cfg.ReplayCache
	if n == 0 {
		n = DefaultReplayCache
	}
	if n < 0 {
		return nil
	}
	t.tail.CompareAndSwap(nil, &tail{cap: n, base: UnknownSeq})
	return t.tail.Load()
}

// barrier returns once any delivery of topic that was under way has
// finished: a delivery that checked a client's hold before the hold began
// cannot then reach the client after the resume's history read.
func (h *hub) barrier(topic string) {
	s := h.shard(topic)
	s.mu.Lock()
	t := s.topics[topic]
	s.mu.Unlock()
	if t != nil {
		t.recvMu.Lock()
		t.recvMu.Unlock() // empty: waiting is the point
	}
}

// tailOf returns topic's tail, or nil.
func (h *hub) tailOf(topic string) *tail {
	s := h.shard(topic)
	s.mu.Lock()
	t := s.topics[topic]
	s.mu.Unlock()
	if t == nil {
		return nil
	}
	return t.tail.Load()
}
