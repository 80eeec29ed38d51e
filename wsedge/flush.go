package wsedge

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"time"
)

// flusher writes the queues of connections that have something to send.
// Connections line up on a lock-free list; the flusher takes the whole list
// at once and writes each connection's queued frames with one writev. While
// it works through a long list, later frames pile up behind it, so a busy
// server writes many frames per syscall and an idle one writes at once.
type flusher struct {
	e    *Edge
	head atomic.Pointer[conn]
	wch  chan struct{}
	w    writer
}

func newFlusher(e *Edge) *flusher {
	return &flusher{e: e, wch: make(chan struct{}, 1)}
}

// schedule puts c on the list; c must have just moved to wScheduled.
func (f *flusher) schedule(c *conn) {
	for {
		old := f.head.Load()
		c.next = old
		if f.head.CompareAndSwap(old, c) {
			if old == nil {
				f.wake()
			}
			return
		}
	}
}

func (f *flusher) wake() {
	select {
	case f.wch <- struct{}{}:
	default:
	}
}

func (f *flusher) run() {
	defer f.e.wg.Done()
	for {
		select {
		case <-f.wch:
		case <-f.e.done:
			return
		}
		for list := f.head.Swap(nil); list != nil; list = f.head.Swap(nil) {
			// The list is a stack: reverse it, so that connections are
			// written in the order they became ready. A connection then
			// keeps its place from one pass to the next, and waits one pass
			// between writes rather than anything from none to two.
			var fifo *conn
			for c := list; c != nil; {
				next := c.next
				c.next = fifo
				fifo = c
				c = next
			}
			list = fifo
			for c := list; c != nil; {
				next := c.next
				c.next = nil
				c.flush(&f.w)
				c = next
			}
		}
	}
}

// flush writes what c has queued without blocking; a peer that cannot take
// it all gets a goroutine that waits for it.
func (c *conn) flush(w *writer) {
	c.mu.Lock()
	if c.closed || len(c.q) == 0 {
		c.wstate = wIdle
		c.mu.Unlock()
		return
	}
	frames := c.q
	c.q, c.spare = c.spare[:0], nil
	c.wstate = wWriting
	c.mu.Unlock()

	if c.rc == nil {
		go c.writeBlocking(frames)
		return
	}
	n, err := w.writev(c.rc, frames)
	total := sizeOf(frames)
	if n == total {
		c.wrote(frames, total)
		return
	}
	if err != nil && !errors.Is(err, syscall.EAGAIN) {
		c.terminate(1006, "write failed")
		return
	}
	go c.writeSlow(frames, n)
}

// wrote accounts for a completed write and decides what happens next.
func (c *conn) wrote(frames [][]byte, n int) {
	c.edge.metrics.BytesOut.Add(float64(n))
	c.edge.metrics.Writes.Inc()
	entries := len(frames)
	clear(frames)
	c.mu.Lock()
	c.queued -= n + entries*queueEntryCost
	if c.spare == nil && cap(frames) <= 64 {
		c.spare = frames[:0]
	}
	more := len(c.q) > 0
	if more {
		c.wstate = wScheduled
	} else {
		c.wstate = wIdle
	}
	done := !more && c.closing && !c.closed
	drained := !more && c.needDrain
	c.needDrain = false
	c.mu.Unlock()
	switch {
	case done:
		c.terminate(c.closeErr.code, c.closeErr.reason)
	case more:
		c.flusher.schedule(c)
	}
	if drained && c.edge.opts.Drain != nil && !done {
		c.edge.opts.Drain(c.client)
	}
}

// writeSlow finishes a partial write, parking until the socket is writable.
func (c *conn) writeSlow(frames [][]byte, written int) {
	c.mu.Lock()
	c.needDrain = true
	c.mu.Unlock()
	total := sizeOf(frames)
	var w writer
	rest := advance(frames, written)
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		for len(rest) > 0 {
			var n int
			n, werr = w.writevFD(fd, rest)
			rest = advance(rest, n)
			if werr != nil {
				return !errors.Is(werr, syscall.EAGAIN) // false: wait until writable
			}
		}
		return true
	})
	if err == nil {
		err = werr
	}
	if err != nil {
		c.terminate(1006, "write failed")
		return
	}
	c.wrote(frames, total)
}

// writeBlocking writes through net.Conn for connections without a raw fd.
func (c *conn) writeBlocking(frames [][]byte) {
	for {
		total := sizeOf(frames)
		bufs := net.Buffers(append([][]byte(nil), frames...))
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.edge.writeTimeout()))
		if _, err := bufs.WriteTo(c.nc); err != nil {
			c.terminate(1006, "write failed")
			return
		}
		c.edge.metrics.BytesOut.Add(float64(total))
		c.edge.metrics.Writes.Inc()
		clear(frames)
		c.mu.Lock()
		c.queued -= total + len(frames)*queueEntryCost
		if len(c.q) == 0 {
			c.wstate = wIdle
			done := c.closing && !c.closed
			c.mu.Unlock()
			if done {
				c.terminate(c.closeErr.code, c.closeErr.reason)
			}
			return
		}
		frames = c.q
		c.q = nil
		c.mu.Unlock()
	}
}

// writeTimeout bounds one blocking write: a peer that takes longer than the
// idle timeout to accept bytes is gone.
func (e *Edge) writeTimeout() time.Duration {
	if e.opts.IdleTimeout > 0 {
		return e.opts.IdleTimeout
	}
	return DefaultIdleTimeout
}

func (e *Edge) dropBackpressure() { e.dropBP.Inc() }

func sizeOf(frames [][]byte) int {
	n := 0
	for _, f := range frames {
		n += len(f)
	}
	return n
}

// advance drops the first n bytes of frames (without copying any frame).
func advance(frames [][]byte, n int) [][]byte {
	for n > 0 && len(frames) > 0 {
		if n >= len(frames[0]) {
			n -= len(frames[0])
			frames = frames[1:]
			continue
		}
		frames[0] = frames[0][n:]
		n = 0
	}
	for len(frames) > 0 && len(frames[0]) == 0 {
		frames = frames[1:]
	}
	return frames
}
