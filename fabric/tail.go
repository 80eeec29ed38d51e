package fabric

import "sync"

// DefaultReplayCache is how many recent messages of each persistent topic
// with local subscribers an instance keeps for resumes (the seed's
// maxPerTopic).
const DefaultReplayCache = 200

// tail is the recent history of one topic as this instance received it
// live: a contiguous chain of stored messages, verified with each message's
// predecessor sequence. It covers every message of the topic with a
// sequence above base, so a resume from such a sequence needs no read from
// the history store.
type tail struct {
	mu   sync.Mutex
	cap  int
	base uint64     // the predecessor of the oldest kept message
	ring []*Message // oldest at head once full
	head int
}

// add appends m (stored with sequence m.Seq, predecessor prev); a message
// that does not follow the last one restarts the chain.
func (t *tail) add(m *Message, prev uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if prev == UnknownSeq {
		t.ring, t.head, t.base = t.ring[:0], 0, UnknownSeq
		return
	}
	if n := len(t.ring); n == 0 || t.lastLocked() != prev {
		clear(t.ring)
		t.ring, t.head, t.base = t.ring[:0], 0, prev // a gap: start again here
	}
	if len(t.ring) < t.cap {
		t.ring = append(t.ring, m)
		return
	}
	t.base = t.ring[t.head].Seq
	t.ring[t.head] = m
	t.head = (t.head + 1) % t.cap
}

func (t *tail) lastLocked() uint64 {
	if len(t.ring) == 0 {
		return t.base
	}
	return t.ring[(t.head+len(t.ring)-1)%len(t.ring)].Seq
}

// since returns the kept messages after seq when the chain covers them
// and seq is known to it (the base, or a kept message); ok is false when
// the history store must answer instead.
func (t *tail) since(seq uint64) (out []*Message, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.base == UnknownSeq || seq < t.base || len(t.ring) == 0 && seq != t.base {
		return nil, false
	}
	found := seq == t.base
	for i := range len(t.ring) {
		m := t.ring[(t.head+i)%len(t.ring)]
		switch {
		case m.Seq > seq:
			out = append(out, m)
		case m.Seq == seq:
			found = true
		}
	}
	return out, found
}
