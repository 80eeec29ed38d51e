package workers

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Worker is a worker process's side of the control socket: what its
// primary told it (Init), the listeners it inherited, and the answers to
// the health checks (Serve).
type Worker struct {
	conn      net.Conn
	rd        *bufio.Reader
	init      Init
	listeners []net.Listener
	primary   atomic.Pointer[json.RawMessage]
	done      chan struct{}
	closeOnce sync.Once
}

// Attach takes the control socket (ControlFD) and the listeners a
// Supervisor handed this process, and reads the init message (within
// timeout). It fails in a process that was not started by a Supervisor.
func Attach(timeout time.Duration) (*Worker, error) {
	f := os.NewFile(ControlFD, "fabric-control")
	if f == nil {
		return nil, errors.New("workers: no control socket (fd 3): not started by a primary")
	}
	conn, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		return nil, fmt.Errorf("workers: control socket (fd 3): %w", err)
	}
	w := &Worker{conn: conn, rd: bufio.NewReaderSize(conn, maxLine), done: make(chan struct{})}
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	m, err := readMsg(w.rd)
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil || m.Type != "init" || m.Init == nil {
		conn.Close()
		if err == nil {
			err = fmt.Errorf("first message is %q", m.Type)
		}
		return nil, fmt.Errorf("workers: no init message from the primary: %w", err)
	}
	w.init = *m.Init
	for i := range w.init.Listeners {
		lf := os.NewFile(uintptr(FirstListenerFD+i), fmt.Sprintf("fabric-listener-%d", i))
		if lf == nil {
			w.Close()
			return nil, fmt.Errorf("workers: listener %d (fd %d) missing", i, FirstListenerFD+i)
		}
		ln, err := net.FileListener(lf)
		_ = lf.Close()
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("workers: listener %d (fd %d): %w", i, FirstListenerFD+i, err)
		}
		l := &pausable{Listener: ln, closed: make(chan struct{}), gate: make(chan struct{})}
		if !w.init.Gated {
			close(l.gate)
			l.opened.Store(true)
		}
		w.listeners = append(w.listeners, l)
	}
	return w, nil
}

// StartAccepting lets the listeners of a gated worker (Init.Gated) accept;
// it does nothing on the others, or twice.
func (w *Worker) StartAccepting() {
	for _, l := range w.listeners {
		l.(*pausable).open()
	}
}

// StopAccepting releases the inherited listeners at once: this process
// accepts no more connections (the kernel queues new ones on the socket for
// the other processes holding it), while the connections it has accepted
// go on; the listeners' Accept then waits for their Close. A worker that
// drains calls it first, lets the requests already accepted reach their
// handlers, and only then refuses new streams: no connection attempt that
// the kernel gave this process is refused for the drain.
func (w *Worker) StopAccepting() {
	for _, l := range w.listeners {
		l.(*pausable).pause()
	}
}

// pausable is a listener whose socket can be released before Close.
type pausable struct {
	net.Listener
	gate      chan struct{} // closed once Accept may accept
	opened    atomic.Bool
	paused    atomic.Bool
	closed    chan struct{}
	closeOnce sync.Once
	pauseOnce sync.Once
}

func (l *pausable) open() {
	if l.opened.CompareAndSwap(false, true) {
		close(l.gate)
	}
}

func (l *pausable) Accept() (net.Conn, error) {
	select {
	case <-l.gate:
	case <-l.closed:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil && l.paused.Load() {
		<-l.closed
		return nil, net.ErrClosed
	}
	return c, err
}

func (l *pausable) pause() {
	l.pauseOnce.Do(func() {
		l.paused.Store(true)
		_ = l.Listener.Close()
	})
}

func (l *pausable) Close() error {
	l.pause()
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

// Init returns the init message.
func (w *Worker) Init() Init { return w.init }

// Listeners returns the inherited listeners, in the order the primary gave
// them (the caller closes them, usually by serving on them).
func (w *Worker) Listeners() []net.Listener { return w.listeners }

// Primary returns what the primary's last ping said of it (nil before one).
func (w *Worker) Primary() json.RawMessage {
	if p := w.primary.Load(); p != nil {
		return *p
	}
	return nil
}

// Serve answers the primary's pings with health() until the control socket
// ends (the primary exited or closed it) or Close; then Done is closed. It
// returns nil when the primary went away, the read error otherwise.
func (w *Worker) Serve(health func() Health) error {
	defer w.Close()
	for {
		m, err := w.rd.ReadSlice('\n')
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("workers: control socket: %w", err)
		}
		var msg message
		if json.Unmarshal(m, &msg) != nil || msg.Type != "ping" {
			continue
		}
		if len(msg.Primary) > 0 {
			p := append(json.RawMessage(nil), msg.Primary...)
			w.primary.Store(&p)
		}
		h := health()
		if err := writeMsg(w.conn, message{Type: "pong", ID: msg.ID, Health: &h}, 5*time.Second); err != nil {
			return err
		}
	}
}

// Done is closed once the control socket has ended: the worker should
// drain and exit.
func (w *Worker) Done() <-chan struct{} { return w.done }

// Close ends the control socket.
func (w *Worker) Close() {
	w.closeOnce.Do(func() {
		_ = w.conn.Close()
		close(w.done)
	})
}
