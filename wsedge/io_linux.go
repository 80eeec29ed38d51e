//go:build linux

package wsedge

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawIO: sockets are written with non-blocking writev on their fd.
const rawIO = true

var errAgain = syscall.EAGAIN

// writer issues writev for a flusher; its iovec array is reused.
type writer struct {
	iov  []unix.Iovec
	bufs [][]byte
	n    int
	err  error
	fn   func(fd uintptr) bool
}

// writev writes frames once without blocking and returns the bytes written;
// a full socket buffer returns EAGAIN with the count so far.
func (w *writer) writev(rc syscall.RawConn, frames [][]byte) (int, error) {
	if w.fn == nil {
		w.fn = w.do // bound once: no allocation per write
	}
	w.bufs, w.n, w.err = frames, 0, nil
	err := rc.Write(w.fn)
	w.bufs = nil
	if err != nil {
		return w.n, err
	}
	return w.n, w.err
}

func (w *writer) do(fd uintptr) bool {
	w.n, w.err = w.writevFD(fd, w.bufs)
	return true
}

// writevFD writes frames to fd, up to IOV_MAX buffers per syscall.
func (w *writer) writevFD(fd uintptr, frames [][]byte) (int, error) {
	total := 0
	for len(frames) > 0 {
		k := min(len(frames), 1024)
		w.iov = w.iov[:0]
		want := 0
		for i := range frames[:k] {
			if f := frames[i]; len(f) > 0 {
				v := unix.Iovec{Base: &f[0]}
				v.SetLen(len(f))
				w.iov = append(w.iov, v)
				want += len(f)
			}
		}
		if len(w.iov) == 0 {
			frames = frames[k:]
			continue
		}
		n, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&w.iov[0])), uintptr(len(w.iov)))
		clear(w.iov) // drop references to frames
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return total, e
		}
		total += int(n)
		if int(n) < want {
			return total, syscall.EAGAIN // socket buffer full
		}
		frames = frames[k:]
	}
	return total, nil
}

// rawRead reads once from the socket without blocking into c.rbuf.
func (c *conn) rawRead(fd uintptr) bool {
	n, err := syscall.Read(int(fd), c.rbuf)
	if n < 0 {
		n = 0
	}
	c.rn, c.rerr = n, err
	return true
}

// poller waits for readable sockets with epoll (one-shot, re-armed after
// each read) and reads each one on a short-lived goroutine, so an idle
// connection holds no goroutine and no buffer. The epoll fd itself is
// waited on through Go's netpoller: the poller goroutine parks without
// holding a thread or a P in a blocking epoll_wait (a P held that way is
// only handed on when sysmon notices, which on 2 cores delayed everything
// else by milliseconds).
type poller struct {
	e     *Edge
	epfd  int
	epf   *os.File // epfd, registered with the Go netpoller
	eprc  syscall.RawConn
	evfd  int
	conns sync.Map // fd (int) → *conn
}

const pollEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

func newPoller(e *Edge) (*poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(evfd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, err
	}
	epf := os.NewFile(uintptr(epfd), "epoll")
	rc, err := epf.SyscallConn()
	if err != nil {
		epf.Close()
		unix.Close(evfd)
		return nil, err
	}
	return &poller{e: e, epfd: epfd, epf: epf, eprc: rc, evfd: evfd}, nil
}

func (p *poller) add(c *conn) error {
	p.conns.Store(c.fd, c)
	var cerr error
	err := c.rc.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: pollEvents, Fd: int32(fd)}
		cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		p.conns.CompareAndDelete(c.fd, c)
	}
	return err
}

func (p *poller) rearm(c *conn) {
	_ = c.rc.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: pollEvents, Fd: int32(fd)}
		_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev)
	})
}

func (p *poller) remove(c *conn) {
	_ = c.rc.Control(func(fd uintptr) {
		_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
	p.conns.CompareAndDelete(c.fd, c)
}

func (p *poller) wake() {
	var one [8]byte
	one[0] = 1
	_, _ = unix.Write(p.evfd, one[:])
}

func (p *poller) close() {
	p.epf.Close()
	unix.Close(p.evfd)
}

func (p *poller) run() {
	defer p.e.wg.Done()
	events := make([]unix.EpollEvent, 512)
	for {
		var n int
		var err error
		rerr := p.eprc.Read(func(fd uintptr) bool {
			n, err = unix.EpollWait(int(fd), events, 0)
			return n != 0 || err != nil && !errors.Is(err, unix.EINTR)
		})
		if rerr != nil {
			p.e.log.Error("epoll wait failed", "err", rerr)
			return
		}
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			p.e.log.Error("epoll wait failed", "err", err)
			return
		}
		for i := range n {
			fd := int(events[i].Fd)
			if fd == p.evfd {
				select {
				case <-p.e.done:
					return
				default:
					var b [8]byte
					_, _ = unix.Read(p.evfd, b[:])
					continue
				}
			}
			if v, ok := p.conns.Load(fd); ok {
				go v.(*conn).onReadable()
			}
		}
	}
}
