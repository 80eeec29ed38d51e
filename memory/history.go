package memory

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// History is fabric.History on a Backend: a ring of the last MaxPerTopic
// messages of each topic (younger than MaxAge, when set).
//
// Sequences are per topic and contiguous: 1, 2, 3... in each epoch. Append
// stores and delivers under the topic's lock, so subscribers get a topic's
// messages in sequence order, each with the exact sequence of the one
// before (prev). Append never fails once it has started storing: a failed
// Append (closed backend, ctx already done) stored nothing. An Append with
// a msgID the topic stored within the last DedupeWindow (2 minutes, at most
// DedupeMax ids per topic) returns that message's position instead.
//
// An epoch names one incarnation of a topic's history. It stays the same
// from before a topic's first message for as long as its history is kept;
// it changes when the history is dropped (MaxTopics eviction, WipeHistory),
// and the sequences of the next incarnation start again from 1.
type History struct{ b *Backend }

// history is one incarnation of a topic's history. Its fields are guarded
// by the topic's mu.
type history struct {
	epoch string
	base  *epochBase
	last  uint64 // the last sequence assigned
	// dropped is the highest sequence no longer retained (0: none): the
	// retained messages are exactly dropped+1 ... last.
	dropped uint64
	ring    ring
	// ids are the msgIDs appended within the dedupe window, oldest first
	// in order (bounded by dedupeMax), each with its sequence.
	ids   map[string]uint64
	order []idAt
}

type idAt struct {
	id  string
	at  int64
	seq uint64
}

// Dedupe bounds of Append's msgID.
const (
	// DedupeWindow is how long a msgID is remembered.
	DedupeWindow = 2 * time.Minute
	// DedupeMax is the most msgIDs remembered per topic.
	DedupeMax = 10_000
)

// seen returns the sequence msgID was stored with, forgetting ids past the
// window first.
func (h *history) seen(id string, now int64) (uint64, bool) {
	for len(h.order) > 0 && (h.order[0].at < now-int64(DedupeWindow) || len(h.order) > DedupeMax) {
		delete(h.ids, h.order[0].id)
		h.order[0] = idAt{}
		h.order = h.order[1:]
	}
	seq, ok := h.ids[id]
	return seq, ok
}

func (h *history) remember(id string, now int64, seq uint64) {
	if h.ids == nil {
		h.ids = map[string]uint64{}
	}
	h.ids[id] = seq
	h.order = append(h.order, idAt{id, now, seq})
}

type entry struct {
	at  int64 // Backend.now() when appended
	env []byte
}

// ring is a growable ring buffer of entries, oldest at head.
type ring struct {
	buf  []entry
	head int
	n    int
}

func (r *ring) push(e entry, capacity int) (droppedOldest bool) {
	if r.n == len(r.buf) && len(r.buf) < capacity {
		nb := make([]entry, min(max(2*len(r.buf), 8), capacity))
		for i := range r.n {
			nb[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = nb, 0
	}
	if r.n == len(r.buf) { // full at capacity: overwrite the oldest
		r.buf[r.head] = e
		r.head = (r.head + 1) % len(r.buf)
		return true
	}
	r.buf[(r.head+r.n)%len(r.buf)] = e
	r.n++
	return false
}

func (r *ring) at(i int) *entry { return &r.buf[(r.head+i)%len(r.buf)] }

func (r *ring) popFront() {
	r.buf[r.head] = entry{}
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	if r.n == 0 {
		r.buf, r.head = nil, 0 // an idle topic keeps no buffer
	}
}

// expire drops the messages appended before cutoff (Backend.now() values).
func (h *history) expire(cutoff int64) {
	for h.ring.n > 0 && h.ring.at(0).at < cutoff {
		h.ring.popFront()
		h.dropped++
	}
}

// cutoff is the oldest append time still retained, or MinInt64.
func (b *Backend) cutoff(now int64) int64 {
	if b.opts.MaxAge <= 0 {
		return math.MinInt64
	}
	return now - int64(b.opts.MaxAge)
}

// History returns the backend's History (the same for every call). It
// delivers through the backend's Brokers: give a Node both.
func (b *Backend) History() *History { return b.history }

// Append implements fabric.History: it assigns topic's next sequence,
// stores a copy of envelope and delivers it to the topic's subscribers on
// every Node, all under the topic's lock, before returning.
func (hs *History) Append(ctx context.Context, topic string, envelope []byte, msgID string) (fabric.Position, error) {
	if err := ctx.Err(); err != nil {
		return fabric.Position{}, fmt.Errorf("memory: append to %q: %w", clip(topic), err)
	}
	b := hs.b
	env := bytes.Clone(envelope)
	if env == nil {
		env = []byte{}
	}
	hash := b.hash(topic)
	s := b.shardOf(hash)
	for {
		if b.closed.Load() {
			return fabric.Position{}, fmt.Errorf("memory: append to %q: %w", clip(topic), ErrClosed)
		}
		s.mu.Lock()
		t := s.topics[topic]
		if t == nil {
			t = &topicState{name: topic, hash: hash}
			s.topics[topic] = t
		}
		h := t.hist.Load()
		created := h == nil
		if created {
			base := b.base.Load()
			h = &history{base: base, epoch: base.epoch(s.gens[genSlot(hash)])}
			t.hist.Store(h)
			s.pushFront(t)
			b.histCount.Add(1)
		} else {
			s.moveFront(t)
		}
		t.tick = b.tick.Add(1)
		s.mu.Unlock()
		if created {
			b.evictOver()
		}

		t.mu.Lock()
		if t.hist.Load() != h {
			t.mu.Unlock() // dropped meanwhile: start again on the new incarnation
			continue
		}
		now := b.now()
		h.expire(b.cutoff(now))
		if msgID != "" {
			if seq, dup := h.seen(msgID, now); dup {
				pos := fabric.Position{Seq: seq, Epoch: h.epoch}
				t.mu.Unlock()
				return pos, nil
			}
			h.remember(msgID, now, h.last+1)
		}
		prev := h.last
		h.last++
		if h.ring.push(entry{at: now, env: env}, b.opts.MaxPerTopic) {
			h.dropped++
		}
		t.deliver(env, h.last, prev)
		pos := fabric.Position{Seq: h.last, Epoch: h.epoch}
		t.mu.Unlock()
		return pos, nil
	}
}

// Since implements fabric.History. Complete is false when a message after
// seq (> 0) is no longer retained, or when seq is beyond the last sequence
// of the current epoch (it belongs to another one). Since 0 is always
// complete: a reader that has nothing loses nothing, it gets every message
// retained. The envelopes returned are shared with the store: do not modify
// them.
func (hs *History) Since(ctx context.Context, topic string, seq uint64, limit int) (fabric.Range, error) {
	if err := ctx.Err(); err != nil {
		return fabric.Range{}, fmt.Errorf("memory: history of %q: %w", clip(topic), err)
	}
	t, h, epoch := hs.b.current(topic)
	if h == nil {
		return fabric.Range{Complete: seq == 0, Epoch: epoch}, nil
	}
	defer t.mu.Unlock()
	h.expire(hs.b.cutoff(hs.b.now()))
	rng := fabric.Range{Epoch: h.epoch, Complete: seq == 0 || seq >= h.dropped && seq <= h.last}
	from := max(seq, h.dropped) + 1
	if from > h.last {
		return rng, nil
	}
	n := int(h.last - from + 1)
	if limit > 0 && n > limit {
		n, rng.More = limit, true
	}
	rng.Messages = make([]fabric.Stored, n)
	skip := int(from - h.dropped - 1)
	for i := range n {
		rng.Messages[i] = fabric.Stored{Seq: from + uint64(i), Envelope: h.ring.at(skip + i).env}
	}
	return rng, nil
}

// Last implements fabric.History: the last sequence assigned in the current
// epoch, whether or not that message is still retained (Seq 0: none yet).
func (hs *History) Last(ctx context.Context, topic string) (fabric.Position, error) {
	if err := ctx.Err(); err != nil {
		return fabric.Position{}, fmt.Errorf("memory: last of %q: %w", clip(topic), err)
	}
	t, h, epoch := hs.b.current(topic)
	if h == nil {
		return fabric.Position{Epoch: epoch}, nil
	}
	defer t.mu.Unlock()
	return fabric.Position{Seq: h.last, Epoch: h.epoch}, nil
}

// Epoch implements fabric.History. A topic that has no history yet already
// has the epoch its first Append will report.
func (hs *History) Epoch(ctx context.Context, topic string) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("memory: epoch of %q: %w", clip(topic), err)
	}
	b := hs.b
	hash := b.hash(topic)
	s := b.shardOf(hash)
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.topics[topic]; t != nil {
		if h := t.hist.Load(); h != nil {
			return h.epoch, nil
		}
	}
	return b.base.Load().epoch(s.gens[genSlot(hash)]), nil
}

// current returns topic's state with its mu held and its history, or a nil
// history (and nothing locked) with the epoch a topic without history has.
func (b *Backend) current(name string) (*topicState, *history, string) {
	hash := b.hash(name)
	s := b.shardOf(hash)
	for {
		s.mu.Lock()
		t := s.topics[name]
		var h *history
		if t != nil {
			h = t.hist.Load()
		}
		if h == nil {
			e := b.base.Load().epoch(s.gens[genSlot(hash)])
			s.mu.Unlock()
			return nil, nil, e
		}
		s.mu.Unlock()
		t.mu.Lock()
		if t.hist.Load() == h {
			return t, h, h.epoch
		}
		t.mu.Unlock() // dropped meanwhile: look again
	}
}

// WipeHistory forgets every topic's history, as if the store had been
// recreated: every topic gets a new epoch and its sequences start again;
// the sequences of the old epochs read as incomplete. For tests.
func (b *Backend) WipeHistory() {
	nb := newEpochBase()
	b.base.Store(nb)
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for t := s.head; t != nil; {
			next := t.next
			if h := t.hist.Load(); h != nil && h.base != nb {
				s.dropHistory(b, t)
			}
			t = next
		}
		s.mu.Unlock()
	}
}

// evictOver drops the least recently appended histories while there are
// more than MaxTopics.
func (b *Backend) evictOver() {
	limit := int64(b.opts.MaxTopics)
	if b.histCount.Load() <= limit {
		return
	}
	b.evictMu.Lock()
	defer b.evictMu.Unlock()
	for b.histCount.Load() > limit {
		var oldest *shard
		tick := uint64(math.MaxUint64)
		for i := range b.shards {
			s := &b.shards[i]
			s.mu.Lock()
			if s.tail != nil && s.tail.tick < tick {
				oldest, tick = s, s.tail.tick
			}
			s.mu.Unlock()
		}
		if oldest == nil {
			return
		}
		oldest.mu.Lock()
		if t := oldest.tail; t != nil && t.tick == tick { // else appended meanwhile: look again
			oldest.dropHistory(b, t)
			b.evictions.Add(1)
			oldest.gens[genSlot(t.hash)]++
		}
		oldest.mu.Unlock()
	}
}

// dropHistory forgets t's history. s.mu is held.
func (s *shard) dropHistory(b *Backend, t *topicState) {
	t.hist.Store(nil)
	s.unlink(t)
	b.histCount.Add(-1)
	s.removeIfUnused(t)
}

// expireHistories drops expired messages of every topic (the sweep); buf
// is reused between sweeps.
func (b *Backend) expireHistories(buf []*topicState) []*topicState {
	for i := range b.shards {
		s := &b.shards[i]
		buf = buf[:0]
		s.mu.Lock()
		for t := s.head; t != nil; t = t.next {
			buf = append(buf, t)
		}
		s.mu.Unlock()
		cutoff := b.cutoff(b.now())
		for _, t := range buf {
			t.mu.Lock()
			if h := t.hist.Load(); h != nil {
				h.expire(cutoff)
			}
			t.mu.Unlock()
		}
		select {
		case <-b.done:
			clear(buf)
			return buf[:0]
		default:
		}
	}
	clear(buf)
	return buf[:0]
}

// The shard's list of topics with a history, most recently appended first.
// s.mu is held for all of these.

func (s *shard) pushFront(t *topicState) {
	t.prev, t.next = nil, s.head
	if s.head != nil {
		s.head.prev = t
	}
	s.head = t
	if s.tail == nil {
		s.tail = t
	}
}

func (s *shard) unlink(t *topicState) {
	if t.prev != nil {
		t.prev.next = t.next
	} else if s.head == t {
		s.head = t.next
	}
	if t.next != nil {
		t.next.prev = t.prev
	} else if s.tail == t {
		s.tail = t.prev
	}
	t.prev, t.next = nil, nil
}

func (s *shard) moveFront(t *topicState) {
	if s.head == t {
		return
	}
	s.unlink(t)
	s.pushFront(t)
}

var _ fabric.History = (*History)(nil)
