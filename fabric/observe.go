package fabric

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
	"sync/atomic"
)

// Observer is told about connections and subscriptions on one Node, whatever
// transport made them. Extensions such as presence use it instead of edge
// hooks, so that an unsubscribe is seen as well as a subscribe.
//
// Subscribed, Unsubscribed and Disconnected run with the client's lock held,
// in the order the changes happened: they must be quick and must not call
// Subscribe, Unsubscribe, Topics, Subscribed or Disconnect for that client.
// Sending to it (Send, PublishLocal) is fine.
type Observer interface {
	// Connected runs once a connection is attached, before any subscribe.
	Connected(c *Client)
	// Subscribed runs after c has become a subscriber of topic.
	Subscribed(c *Client, topic string)
	// Unsubscribed runs after c has stopped being a subscriber of topic
	// through Unsubscribe (not through Disconnect).
	Unsubscribed(c *Client, topic string)
	// Disconnected runs once when c is detached; its subscriptions are gone.
	Disconnected(c *Client)
}

// nodeExt holds what the extension points of this file add to a Node.
type nodeExt struct {
	obsMu     sync.Mutex
	obsNext   uint64
	observers atomic.Pointer[[]observerEntry] // copy on write: read without locks

	idOnce sync.Once
	id     string
}

type observerEntry struct {
	id uint64
	o  Observer
}

// Observe registers o for every later connection and subscription change and
// returns a function that removes it.
func (n *Node) Observe(o Observer) (remove func()) {
	x := &n.ext
	x.obsMu.Lock()
	defer x.obsMu.Unlock()
	x.obsNext++
	id := x.obsNext
	var next []observerEntry
	if cur := x.observers.Load(); cur != nil {
		next = append(next, *cur...)
	}
	next = append(next, observerEntry{id, o})
	x.observers.Store(&next)
	var once sync.Once
	return func() {
		once.Do(func() {
			x.obsMu.Lock()
			defer x.obsMu.Unlock()
			var kept []observerEntry
			if cur := x.observers.Load(); cur != nil {
				for _, e := range *cur {
					if e.id != id {
						kept = append(kept, e)
					}
				}
			}
			x.observers.Store(&kept)
		})
	}
}

func (x *nodeExt) list() []observerEntry {
	if p := x.observers.Load(); p != nil {
		return *p
	}
	return nil
}

func (x *nodeExt) connected(c *Client) {
	for _, e := range x.list() {
		e.o.Connected(c)
	}
}

func (x *nodeExt) subscribed(c *Client, topic string) {
	for _, e := range x.list() {
		e.o.Subscribed(c, topic)
	}
}

func (x *nodeExt) unsubscribed(c *Client, topic string) {
	for _, e := range x.list() {
		e.o.Unsubscribed(c, topic)
	}
}

func (x *nodeExt) disconnected(c *Client) {
	for _, e := range x.list() {
		e.o.Disconnected(c)
	}
}

// ID returns a random identifier of this Node, unique across the instances of
// a cluster (16 hex digits, chosen on first use).
func (n *Node) ID() string {
	x := &n.ext
	x.idOnce.Do(func() {
		var b [8]byte
		_, _ = rand.Read(b[:])
		x.id = hex.EncodeToString(b[:])
	})
	return x.id
}

// PublishLocal delivers {topic, event, data} to this instance's subscribers
// of topic only, without the broker, and returns how many it reached. The
// envelope is encoded and framed once. Extensions use it for events every
// instance derives itself (presence), where a cluster-wide publish would
// reach each subscriber once per instance.
func (n *Node) PublishLocal(topic, event string, data any) (int, error) {
	if err := ValidateTopic(topic); err != nil {
		return 0, err
	}
	subs := n.hub.local(topic)
	if len(subs) == 0 {
		return 0, nil // nobody here: not even encoded
	}
	m, err := n.message(topic, event, data)
	if err != nil {
		return 0, err
	}
	n.deliver(m, subs)
	return len(subs), nil
}

// SendEnvelope delivers a ready envelope (see AppendEnvelope) on topic to the
// given local connections, framed once, and returns how many accepted it.
func (n *Node) SendEnvelope(to []*Client, topic string, envelope []byte) int {
	if len(to) == 0 {
		return 0
	}
	m := NewMessage(topic, 0, envelope)
	sent := 0
	for _, c := range to {
		if c.transport.Deliver(m) {
			sent++
		}
	}
	n.metrics.MessagesOut.Add(float64(sent))
	return sent
}

// local returns the current local subscribers of topic; the slice must not
// be modified.
func (h *hub) local(topic string) []*Client {
	s := h.shard(topic)
	s.mu.Lock()
	t := s.topics[topic]
	s.mu.Unlock()
	if t == nil {
		return nil
	}
	return t.snapshot()
}

// Closed reports whether c has been disconnected from its node.
func (c *Client) Closed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}
