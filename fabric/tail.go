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
	mu    sync.Mutex
	cap   int
	base  uint64     // the predecessor of the oldest kept message
	ring  []*Message // oldest at head once full
	head  int
	epoch string // the history epoch a resume last saw the chain in
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
//
// epoch is the topic's current history epoch. Live messages do not carry
// their epoch, so a chain is trusted only in the epoch a resume saw it in:
// a chain no resume has seen yet answers nothing and reports unchecked
// (the caller compares it with the store, see adopt); a chain seen in
// another epoch (the store was wiped: its messages may belong to the old
// incarnation) is emptied.
func (t *tail) since(seq uint64, epoch string) (out []*Message, ok, unchecked bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case epoch == "":
		return nil, false, false
	case t.epoch == "":
		return nil, false, t.base != UnknownSeq
	case t.epoch != epoch:
		t.resetLocked()
		t.epoch = epoch
		return nil, false, false
	}
	if t.base == UnknownSeq || seq < t.base || len(t.ring) == 0 && seq != t.base {
		return nil, false, false
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
	return out, found, false
}

// adopt settles an unchecked chain against the store: last is the topic's
// last position there. A chain that does not reach past it belongs to that
// epoch; one that does (a wipe restarted the sequences) is emptied.
func (t *tail) adopt(epoch string, last Position) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.epoch != "" || epoch == "" {
		return
	}
	if last.Epoch != epoch || t.lastLocked() > last.Seq {
		t.resetLocked()
	}
	t.epoch = epoch
}

func (t *tail) resetLocked() {
	clear(t.ring)
	t.ring, t.head, t.base = t.ring[:0], 0, UnknownSeq
}
