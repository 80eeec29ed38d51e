package fabric

import (
	"sync"
	"time"
)

// floorTTL is how long live copies of replayed messages are filtered after a
// resume. Republished copies trail a direct read by milliseconds; the bound
// keeps a stale floor from filtering the new, lower sequences of a
// recreated stream.
const floorTTL = 3 * time.Second

// holdSet is what a client's resumes (see Node.resume) do to its live
// messages: while a resume of a topic reads history, the topic's live
// messages are held back; once it has caught up, live messages already
// covered by the history read are dropped until the live stream passes the
// last replayed sequence (republished messages can reach an instance after
// a direct read of the stream has returned them).
type holdSet struct {
	mu     sync.Mutex
	topics map[string]*heldTopic
}

type heldTopic struct {
	refs       int        // resumes of the topic reading history
	msgs       []*Message // held while refs > 0
	overflowed bool       // held messages were dropped: read history again
	uncapped   bool       // hold everything (the last re-read must converge)
	floor      uint64     // after the resumes: drop live seqs from floorFrom up to this
	floorFrom  uint64     // (copies of replayed messages) ...
	floorUntil time.Time  // ... until then
}

// take holds back or drops m if a resume of its topic calls for it, and
// reports whether it did.
func (h *holdSet) take(m *Message, c *Client) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.topics[m.Topic]
	if t == nil {
		return false
	}
	if t.refs == 0 { // caught up: only filtering duplicates
		if m.Seq == 0 {
			return false
		}
		// A lower sequence than any replayed one, or a late one, is a new
		// message (of a recreated stream), not a copy; except a message read
		// from the store to fill a gap in the live feed, which can come any
		// time before the live stream passes the floor, and is the same
		// message as the one replayed (a new stream restarts the feed's
		// chain instead of leaving a gap).
		if m.Seq >= t.floorFrom && m.Seq <= t.floor && (m.repaired || time.Now().Before(t.floorUntil)) {
			return true
		}
		delete(h.topics, m.Topic) // the live stream has passed the replay
		c.holds.Add(-1)
		return false
	}
	if len(t.msgs) >= c.node.resumeHold && !t.uncapped {
		t.overflowed = true // the history has them: read again at the seam
		clear(t.msgs)
		t.msgs = t.msgs[:0]
	}
	t.msgs = append(t.msgs, m)
	return true
}

// holdTopic starts holding c's live messages of topic.
func (c *Client) holdTopic(topic string) {
	c.holdMu.Lock()
	h := c.hold.Load()
	if h == nil {
		h = &holdSet{topics: make(map[string]*heldTopic)}
		c.hold.Store(h)
	}
	c.holdMu.Unlock()
	h.mu.Lock()
	t := h.topics[topic]
	if t == nil {
		t = &heldTopic{}
		h.topics[topic] = t
		c.holds.Add(1)
	}
	t.refs++
	h.mu.Unlock()
}

// releaseTopic calls flush with the messages held for topic, under the hold
// lock so that no live message of topic overtakes them. flush returns the
// first and last sequences it sent and whether the hold ends; if not, the
// held messages are cleared and holding goes on, for the caller to read
// history again, without a cap when uncap is set (so that the next release
// cannot overflow). releaseTopic returns whether the hold ended.
func (c *Client) releaseTopic(topic string, uncap bool, flush func(held []*Message, overflowed bool) (first, last uint64, done bool)) bool {
	h := c.hold.Load()
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.topics[topic]
	first, last, done := flush(t.msgs, t.overflowed)
	clear(t.msgs)
	t.msgs, t.overflowed = t.msgs[:0], false
	if !done {
		t.uncapped = t.uncapped || uncap
		return false
	}
	t.uncapped = false
	if first > 0 && (t.floorFrom == 0 || first < t.floorFrom) {
		t.floorFrom = first
	}
	t.floor = max(t.floor, last)
	t.floorUntil = time.Now().Add(floorTTL)
	if t.refs--; t.refs == 0 {
		t.msgs = nil
		if t.floor == 0 {
			delete(h.topics, topic)
			c.holds.Add(-1)
		}
	}
	return true
}
