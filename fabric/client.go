package fabric

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// ErrClientClosed is returned for operations on a disconnected client.
var ErrClientClosed = errors.New("fabric: client closed")

// Transport is what a connection implementation (the WebSocket edge, a test
// harness) gives the Node. Deliver must not block: it queues the message or
// drops it and returns false.
type Transport interface {
	// Deliver queues m for the connection; false means it was dropped.
	Deliver(m *Message) bool
	// Close closes the connection with a WebSocket close code and reason.
	Close(code int, reason string)
}

// Client is one connection attached to a Node.
type Client struct {
	id         uint64
	node       *Node
	transport  Transport
	userData   atomic.Pointer[userDataBox] // replaced by a token refresh
	remoteAddr string
	key        string // ConnectionKey

	ctx    context.Context // cancelled by Disconnect
	cancel context.CancelFunc

	mu     sync.Mutex
	topics map[string]struct{}
	closed bool

	holdMu sync.Mutex              // serialises creating hold
	hold   atomic.Pointer[holdSet] // set on the first resume, kept after
	holds  atomic.Int32            // topics in hold; the delivery fast path reads only this

	resume resumeState // queued resumes and their rate (resume.go)
	limits connLimits  // inbound rates and denials (limits.go)

	expMu    sync.Mutex  // token expiry timers (token.go)
	expWarn  *time.Timer // asks for a refresh
	expClose *time.Timer // closes with CloseTokenExpired
}

// ID returns the connection's instance-unique id.
func (c *Client) ID() uint64 { return c.id }

// UserData returns what the Upgrade hook returned for this connection.
func (c *Client) UserData() any {
	if b := c.userData.Load(); b != nil {
		return b.v
	}
	return nil
}

// userDataBox holds user data for an atomic swap.
type userDataBox struct{ v any }

func (c *Client) setUserData(v any) { c.userData.Store(&userDataBox{v}) }

// RemoteAddr returns the peer address the connection came from.
func (c *Client) RemoteAddr() string { return c.remoteAddr }

// Context is cancelled when the client disconnects: work done for it (RPC
// handlers, resumes) should stop then.
func (c *Client) Context() context.Context { return c.ctx }

// Transport returns the connection implementation behind the client.
func (c *Client) Transport() Transport { return c.transport }

// Node returns the node the client is attached to.
func (c *Client) Node() *Node { return c.node }

// Close closes the underlying connection with code and reason.
func (c *Client) Close(code int, reason string) { c.transport.Close(code, reason) }

// Topics returns the topics the client is subscribed to on this instance.
func (c *Client) Topics() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.topics))
	for t := range c.topics {
		out = append(out, t)
	}
	return out
}

// Subscribed reports whether the client is subscribed to topic.
func (c *Client) Subscribed(topic string) bool {
	c.mu.Lock()
	_, ok := c.topics[topic]
	c.mu.Unlock()
	return ok
}

// clientShards spreads the client registry over independent locks.
const clientShards = 64

type clientRegistry struct {
	shards [clientShards]struct {
		mu sync.Mutex
		m  map[uint64]*Client
	}
}

func (r *clientRegistry) add(c *Client) {
	s := &r.shards[c.id%clientShards]
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[uint64]*Client)
	}
	s.m[c.id] = c
	s.mu.Unlock()
}

func (r *clientRegistry) remove(c *Client) bool {
	s := &r.shards[c.id%clientShards]
	s.mu.Lock()
	_, ok := s.m[c.id]
	delete(s.m, c.id)
	s.mu.Unlock()
	return ok
}

func (r *clientRegistry) get(id uint64) *Client {
	s := &r.shards[id%clientShards]
	s.mu.Lock()
	c := s.m[id]
	s.mu.Unlock()
	return c
}

// each calls fn for every client, one shard snapshot at a time, so fn may
// disconnect clients. It stops when fn returns false.
func (r *clientRegistry) each(fn func(*Client) bool) {
	var buf []*Client
	for i := range r.shards {
		s := &r.shards[i]
		s.mu.Lock()
		buf = buf[:0]
		for _, c := range s.m {
			buf = append(buf, c)
		}
		s.mu.Unlock()
		for _, c := range buf {
			if !fn(c) {
				return
			}
		}
	}
}
