//go:build linux

package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// epollReaders reads every connection through epoll (edge-triggered), one
// loop per CPU, the way the server reads: no goroutine per connection, one
// shared read buffer per loop, partial frames kept per connection.
type epollReaders struct {
	w     *worker
	loops []*epollLoop
}

type epollLoop struct {
	w     *worker
	epfd  int
	conns map[int32]*epollConn
	buf   []byte
	out   []byte // replies (pongs) to write
}

type epollConn struct {
	c    *benchConn
	fd   int
	rest []byte // bytes of an incomplete frame
}

func startEpollReaders(w *worker, conns []*benchConn) (bool, error) {
	n := runtime.GOMAXPROCS(0)
	r := &epollReaders{w: w}
	for range n {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return false, err
		}
		r.loops = append(r.loops, &epollLoop{w: w, epfd: epfd, conns: map[int32]*epollConn{}, buf: make([]byte, 256<<10)})
	}
	for _, c := range conns {
		if connFD(c) < 0 {
			return false, nil
		}
	}
	for i, c := range conns {
		l := r.loops[i%len(r.loops)]
		fd := connFD(c)
		ec := &epollConn{c: c, fd: fd}
		if n := c.br.Buffered(); n > 0 {
			// Bytes read past the acknowledgements (a message, a ping):
			// handled now, as the next readiness may never come.
			p, _ := c.br.Peek(n)
			data := bytes.Clone(p)
			used := l.frames(ec, data)
			ec.rest = append(ec.rest[:0], data[used:]...)
		}
		l.conns[int32(fd)] = ec
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			return false, err
		}
	}
	for _, l := range r.loops {
		go l.run()
	}
	return true, nil
}

// connFD returns the socket's file descriptor (the tool owns its sockets
// until the run ends, so the number cannot be reused under it).
func connFD(c *benchConn) int {
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return -1
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	fd := -1
	_ = rc.Control(func(f uintptr) { fd = int(f) })
	return fd
}

func (l *epollLoop) run() {
	events := make([]unix.EpollEvent, 1024)
	wait := -1
	batch := l.w.cfg.ReadBatch
	if batch > 0 {
		wait = 0
	}
	for {
		n, err := unix.EpollWait(l.epfd, events, wait)
		if n == 0 && batch > 0 {
			// Nothing ready: sleep instead of waiting in the sockets' wait
			// queues, so that a server write never has to wake us.
			time.Sleep(batch)
			continue
		}
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		for i := range n {
			if ec := l.conns[events[i].Fd]; ec != nil {
				l.drain(ec)
			}
		}
	}
}

// drain reads until EAGAIN (edge-triggered) and handles whole frames.
func (l *epollLoop) drain(ec *epollConn) {
	for {
		buf := l.buf
		off := copy(buf, ec.rest)
		n, err := unix.Read(ec.fd, buf[off:])
		if n <= 0 {
			if err == unix.EAGAIN || err == unix.EINTR {
				return
			}
			delete(l.conns, int32(ec.fd))
			l.w.closed.Add(1)
			return
		}
		data := buf[:off+n]
		used := l.frames(ec, data)
		ec.rest = append(ec.rest[:0], data[used:]...)
		if off+n < len(buf) {
			return
		}
	}
}

// frames handles the complete frames at the start of data.
func (l *epollLoop) frames(ec *epollConn, data []byte) int {
	used := 0
	now := time.Now().UnixNano()
	for {
		p := data[used:]
		if len(p) < 2 {
			return used
		}
		op := ws.OpCode(p[0] & 0x0f)
		length := int(p[1] & 0x7f)
		hl := 2
		switch length {
		case 126:
			if len(p) < 4 {
				return used
			}
			length, hl = int(binary.BigEndian.Uint16(p[2:])), 4
		case 127:
			if len(p) < 10 {
				return used
			}
			length, hl = int(binary.BigEndian.Uint64(p[2:])), 10
		}
		if len(p) < hl+length {
			return used
		}
		payload := p[hl : hl+length]
		used += hl + length
		switch op {
		case ws.OpText, ws.OpBinary, ws.OpContinuation:
			if out := l.w.onData(&ec.c.st, ec.c.id, payload, now, l.out[:0]); len(out) > 0 {
				_, _ = unix.Write(ec.fd, out)
				l.out = out
			}
		case ws.OpPing:
			var f bytes.Buffer
			_ = ws.WriteFrame(&f, ws.MaskFrame(ws.NewPongFrame(bytes.Clone(payload))))
			_, _ = unix.Write(ec.fd, f.Bytes())
		}
	}
}
