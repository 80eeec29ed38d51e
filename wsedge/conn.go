package wsedge

import (
	"encoding/binary"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/fabricrt/fabric/fabric"
	"github.com/gobwas/ws"
)

// write states of a connection.
const (
	wIdle      = iota // nothing queued, nobody writing
	wScheduled        // on a flusher's list
	wWriting          // a flusher or slow writer owns the socket
)

// conn is one WebSocket connection: a fabric.Transport.
type conn struct {
	edge    *Edge
	client  *fabric.Client
	nc      net.Conn
	rc      syscall.RawConn // nil: blocking I/O through nc
	fd      int
	deflate bool
	flusher *flusher
	next    *conn // flusher list link

	mu         sync.Mutex
	q          [][]byte // frames waiting to be written
	spare      [][]byte // recycled q backing array
	queued     int      // bytes in q and in flight
	wstate     int
	closing    bool        // close frame queued: accept nothing more
	closed     bool        // socket closed
	needDrain  bool        // a write had to wait for the peer
	graceTimer *time.Timer // cuts a closing connection that will not flush

	lastRead atomic.Int64
	pinged   atomic.Bool
	ended    atomic.Bool // detached from the node

	// reader state, owned by whoever reads the socket (one at a time)
	rmu      sync.Mutex
	in       []byte // bytes of an incomplete frame
	frag     []byte // data of an incomplete fragmented message
	fragOp   ws.OpCode
	fragZip  bool
	rbuf     []byte
	rn       int
	rerr     error
	readFn   func(fd uintptr) bool
	closeErr struct {
		code   int
		reason string
	}
}

func newConn(e *Edge, nc net.Conn, deflate bool) *conn {
	c := &conn{edge: e, nc: nc, deflate: deflate, fd: -1}
	c.flusher = e.flushers[e.nextFlusher.Add(1)%uint64(len(e.flushers))]
	c.lastRead.Store(time.Now().UnixNano())
	if tc, ok := nc.(*net.TCPConn); ok && rawIO {
		if rc, err := tc.SyscallConn(); err == nil {
			c.rc = rc
			_ = rc.Control(func(fd uintptr) { c.fd = int(fd) })
		}
	}
	return c
}

// Deliver implements fabric.Transport.
func (c *conn) Deliver(m *fabric.Message) bool {
	frame := m.Frame
	if c.deflate {
		frame = m.Alt(compressFrame)
	}
	return c.enqueue(frame, true)
}

// Close implements fabric.Transport: it queues a close frame and closes the
// socket once everything before it is written.
func (c *conn) Close(code int, reason string) {
	c.startClose(closeFrame(code, reason), code, reason)
}

// startClose queues frame (a close frame) as the connection's last; the
// Close hook will report code and reason.
func (c *conn) startClose(frame []byte, code int, reason string) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	c.closing = true
	c.closeErr.code, c.closeErr.reason = code, reason
	c.q = append(c.q, frame)
	c.queued += len(frame) + queueEntryCost
	sched := c.wstate == wIdle
	if sched {
		c.wstate = wScheduled
	}
	c.mu.Unlock()
	if sched {
		c.flusher.schedule(c)
	}
	// A peer that never reads must not hold the connection open. The timer
	// is stopped when the connection ends, so it never pins a closed conn.
	t := time.AfterFunc(closeGrace, func() { c.terminate(code, reason) })
	c.mu.Lock()
	if c.closed {
		t.Stop()
	} else {
		c.graceTimer = t
	}
	c.mu.Unlock()
}

// queueEntryCost is what one queued frame costs the connection besides its
// bytes: its slot in the queue (a slice header). Counting it keeps a
// connection's queued memory within MaxBackpressure even for tiny frames.
const queueEntryCost = 24

// closeGrace is how long a closing connection may take to flush.
const closeGrace = 5 * time.Second

// enqueue queues one frame; droppable frames are refused past MaxBackpressure.
func (c *conn) enqueue(frame []byte, droppable bool) bool {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		c.edge.dropClosed.Inc()
		return false
	}
	if droppable && c.queued > 0 && c.queued+len(frame)+queueEntryCost > c.edge.opts.MaxBackpressure {
		c.mu.Unlock()
		c.edge.dropBackpressure()
		return false
	}
	c.q = append(c.q, frame)
	c.queued += len(frame) + queueEntryCost
	sched := c.wstate == wIdle
	if sched {
		c.wstate = wScheduled
	}
	c.mu.Unlock()
	if sched {
		c.flusher.schedule(c)
	}
	return true
}

// Buffered returns the bytes queued for the connection and not yet written.
func (c *conn) Buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queued
}

// terminate closes the socket now and ends the connection.
func (c *conn) terminate(code int, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.closing = true
	if c.closeErr.code != 0 {
		// A close this side started: the connection ends with its code,
		// whatever the peer did before echoing it.
		code, reason = c.closeErr.code, c.closeErr.reason
	}
	c.q = nil
	c.spare = nil
	c.queued = 0
	if c.graceTimer != nil {
		c.graceTimer.Stop()
		c.graceTimer = nil
	}
	c.mu.Unlock()
	if c.edge.poller != nil && c.rc != nil {
		c.edge.poller.remove(c)
	}
	_ = c.nc.Close()
	c.end(code, reason)
}

// end detaches the client once (the node runs the Disconnect hook).
func (c *conn) end(code int, reason string) {
	if !c.ended.CompareAndSwap(false, true) {
		return
	}
	c.edge.conns.Delete(c)
	c.edge.nconns.Add(-1)
	c.edge.node.Disconnect(c.client, code, reason)
}

// checkIdle pings a quiet connection and closes a silent one.
func (c *conn) checkIdle(now int64, idle time.Duration) {
	quiet := time.Duration(now - c.lastRead.Load())
	switch {
	case quiet > idle:
		c.terminate(1006, "idle timeout")
	case !c.edge.opts.DisablePings && quiet > idle/2 && c.pinged.CompareAndSwap(false, true):
		c.enqueue(pingFrame, true)
	}
}

var pingFrame = ws.MustCompileFrame(ws.NewPingFrame(nil))

func closeFrame(code int, reason string) []byte {
	if len(reason) > 123 {
		reason = reason[:123]
		for !utf8.ValidString(reason) {
			reason = reason[:len(reason)-1]
		}
	}
	return ws.MustCompileFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusCode(code), reason)))
}

// parseClose reads a close frame body; a malformed one is a protocol error.
func parseClose(p []byte) (code int, reason string, ok bool) {
	switch {
	case len(p) == 0:
		return int(ws.StatusNoStatusRcvd), "", true
	case len(p) == 1:
		return 0, "", false
	}
	code = int(binary.BigEndian.Uint16(p))
	reason = string(p[2:])
	sc := ws.StatusCode(code)
	if !utf8.ValidString(reason) || code < 1000 || sc.IsNotUsed() || (sc.IsProtocolReserved()) ||
		(code >= 1016 && code < 3000) || code >= 5000 {
		return 0, "", false
	}
	return code, reason, true
}
