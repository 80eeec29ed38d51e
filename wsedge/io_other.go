//go:build !linux

package wsedge

import (
	"errors"
	"syscall"
)

// rawIO: without Linux, sockets are written through net.Conn.
const rawIO = false

var errAgain = syscall.EAGAIN

type writer struct{}

func (w *writer) writev(syscall.RawConn, [][]byte) (int, error) {
	return 0, errors.New("wsedge: raw writes need Linux")
}

func (w *writer) writevFD(uintptr, [][]byte) (int, error) {
	return 0, errors.New("wsedge: raw writes need Linux")
}

func (c *conn) rawRead(uintptr) bool { return true }

// poller is Linux-only; elsewhere every connection gets a reading goroutine.
type poller struct{}

func newPoller(*Edge) (*poller, error) { return nil, nil }
func (p *poller) add(*conn) error      { return errors.New("wsedge: no epoll") }
func (p *poller) rearm(*conn)          {}
func (p *poller) remove(*conn)         {}
func (p *poller) wake()                {}
func (p *poller) close()               {}
func (p *poller) run()                 {}
