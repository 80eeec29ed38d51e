package fabric

import (
	"sync"
	"time"
)

// Limits bound what one connection can make an instance hold or do, so
// that an anonymous client on the open internet cannot grow memory,
// goroutines or CPU without bound (docs/security.md). The zero value has
// the defaults; a negative value turns a limit off.
type Limits struct {
	// MaxTopics caps the topics one connection is subscribed to (default
	// 1000); a subscribe past it is denied with LIMIT_EXCEEDED.
	MaxTopics int
	// MaxPresence caps the presence memberships one connection holds
	// (default 100); past it the connection is subscribed but does not
	// join (counted in fabric_limits_exceeded_total{limit="presence"}).
	MaxPresence int
	// RPCRate is the RPC calls per second one connection may make,
	// fabric/publish included, sustained (default 100), with bursts of
	// RPCBurst (default 200); past it a call is answered RATE_LIMITED.
	RPCRate  float64
	RPCBurst int
	// FrameRate is the frames per second one connection may send,
	// sustained (default 500), with bursts of FrameBurst (default 1000);
	// past it the connection is closed with CloseRateLimited (4429).
	FrameRate  float64
	FrameBurst int
	// ByteRate is the inbound bytes per second one connection may send,
	// sustained (default 1 MiB), with bursts of ByteBurst (default 4 MiB);
	// past it the connection is closed with CloseRateLimited.
	ByteRate  float64
	ByteBurst int
	// MaxDenials is how many refused requests (subscribes, replays,
	// publishes, calls) one connection may collect before it is closed
	// with CloseForbidden (default 100).
	MaxDenials int
}

// Defaults of Limits.
const (
	DefaultMaxTopics   = 1000
	DefaultMaxPresence = 100
	DefaultRPCRate     = 100
	DefaultRPCBurst    = 200
	DefaultFrameRate   = 500
	DefaultFrameBurst  = 1000
	DefaultByteRate    = 1 << 20
	DefaultByteBurst   = 4 << 20
	DefaultMaxDenials  = 100
)

// CodeLimitExceeded refuses a request past one of the connection's limits.
const CodeLimitExceeded = "LIMIT_EXCEEDED"

func (l *Limits) setDefaults() {
	setInt := func(p *int, d int) {
		if *p == 0 {
			*p = d
		}
	}
	setFloat := func(p *float64, d float64) {
		if *p == 0 {
			*p = d
		}
	}
	setInt(&l.MaxTopics, DefaultMaxTopics)
	setInt(&l.MaxPresence, DefaultMaxPresence)
	setFloat(&l.RPCRate, DefaultRPCRate)
	setInt(&l.RPCBurst, DefaultRPCBurst)
	setFloat(&l.FrameRate, DefaultFrameRate)
	setInt(&l.FrameBurst, DefaultFrameBurst)
	setFloat(&l.ByteRate, DefaultByteRate)
	setInt(&l.ByteBurst, DefaultByteBurst)
	setInt(&l.MaxDenials, DefaultMaxDenials)
}

// bucket is a token bucket; the zero value is full on first use.
type bucket struct {
	tokens float64
	last   time.Time
}

// take takes n tokens at rate per second, capped at burst; false when there
// are not enough (a negative rate never refuses).
func (b *bucket) take(now time.Time, n, rate float64, burst int) bool {
	if rate < 0 {
		return true
	}
	if b.last.IsZero() {
		b.tokens = float64(burst)
	} else {
		b.tokens = min(float64(burst), b.tokens+now.Sub(b.last).Seconds()*rate)
	}
	b.last = now
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}

// connLimits is one connection's rate state.
type connLimits struct {
	mu      sync.Mutex
	frames  bucket
	bytes   bucket
	rpcs    bucket
	denials int
}

// inbound charges one frame of n bytes; false closes the connection.
func (n *Node) inbound(c *Client, size int) bool {
	l := &n.cfg.Limits
	now := time.Now()
	c.limits.mu.Lock()
	ok := c.limits.frames.take(now, 1, l.FrameRate, l.FrameBurst) && c.limits.bytes.take(now, float64(size), l.ByteRate, l.ByteBurst)
	c.limits.mu.Unlock()
	if !ok {
		n.metrics.LimitsExceeded.WithLabelValues("inbound_rate").Inc()
		c.Close(CloseRateLimited, "sending too fast")
	}
	return ok
}

// allowRPC charges one call; false refuses it.
func (n *Node) allowRPC(c *Client) bool {
	l := &n.cfg.Limits
	c.limits.mu.Lock()
	ok := c.limits.rpcs.take(time.Now(), 1, l.RPCRate, l.RPCBurst)
	c.limits.mu.Unlock()
	if !ok {
		n.metrics.LimitsExceeded.WithLabelValues("rpc_rate").Inc()
	}
	return ok
}

// denied counts one refusal for c and closes it past MaxDenials.
func (n *Node) denied(c *Client) {
	max := n.cfg.Limits.MaxDenials
	if max < 0 {
		return
	}
	c.limits.mu.Lock()
	c.limits.denials++
	over := c.limits.denials == max
	c.limits.mu.Unlock()
	if over {
		n.metrics.LimitsExceeded.WithLabelValues("denials").Inc()
		c.Close(CloseForbidden, "too many refused requests")
	}
}

// topicsFull reports whether c may not subscribe to one more topic.
func (n *Node) topicsFull(c *Client) bool {
	max := n.cfg.Limits.MaxTopics
	if max < 0 {
		return false
	}
	c.mu.Lock()
	full := len(c.topics) >= max
	c.mu.Unlock()
	if full {
		n.metrics.LimitsExceeded.WithLabelValues("topics").Inc()
	}
	return full
}
