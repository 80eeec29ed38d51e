package fabrictest

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Balancer is a TCP load balancer on a free loopback port, as a Kubernetes
// Service or an L4 load balancer would stand in front of Fabric instances:
// each new connection goes to the next backend (round robin) that accepts
// it, and when a backend dies its connections are cut, so that clients
// reconnect through the balancer to a survivor. It stops at cleanup.
type Balancer struct {
	t        testing.TB
	ln       net.Listener
	backends []string
	next     atomic.Uint64
	down     []atomic.Bool

	mu    sync.Mutex
	conns map[net.Conn]int // client side → backend index
	wg    sync.WaitGroup

	accepted atomic.Int64
	// cut counts client connections closed because their backend's side
	// ended first.
	cut []atomic.Int64
}

// NewBalancer starts a balancer in front of backends (host:port each).
func NewBalancer(t testing.TB, backends ...string) *Balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &Balancer{t: t, ln: ln, backends: backends, down: make([]atomic.Bool, len(backends)),
		cut: make([]atomic.Int64, len(backends)), conns: map[net.Conn]int{}}
	b.wg.Add(1)
	go b.accept()
	t.Cleanup(b.Close)
	return b
}

// Addr is the balancer's host:port.
func (b *Balancer) Addr() string { return b.ln.Addr().String() }

// SetDown takes backend i out of rotation (or puts it back), as a failing
// readiness probe would; its existing connections stay.
func (b *Balancer) SetDown(i int, down bool) { b.down[i].Store(down) }

// Connections returns how many client connections each backend holds now.
func (b *Balancer) Connections() []int {
	out := make([]int, len(b.backends))
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, i := range b.conns {
		out[i]++
	}
	return out
}

// Cut returns how many client connections of backend i were cut because
// the backend went away.
func (b *Balancer) Cut(i int) int64 { return b.cut[i].Load() }

// Accepted returns how many client connections the balancer took.
func (b *Balancer) Accepted() int64 { return b.accepted.Load() }

func (b *Balancer) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.accepted.Add(1)
		b.wg.Add(1)
		go b.serve(c)
	}
}

// serve connects c to the first backend, from the next in turn, that is
// not down and accepts the connection; with none, c is closed.
func (b *Balancer) serve(c net.Conn) {
	defer b.wg.Done()
	n := len(b.backends)
	start := int(b.next.Add(1))
	var up net.Conn
	idx := -1
	for k := range n {
		i := (start + k) % n
		if b.down[i].Load() {
			continue
		}
		conn, err := net.DialTimeout("tcp", b.backends[i], 2*time.Second)
		if err == nil {
			up, idx = conn, i
			break
		}
	}
	if up == nil {
		c.Close()
		return
	}
	b.mu.Lock()
	if b.conns == nil { // closed meanwhile
		b.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	b.conns[c] = idx
	b.mu.Unlock()
	backendEnded := make(chan struct{})
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(up, c)
		if tc, ok := up.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(c, up)
		close(backendEnded)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}()
	<-done
	select {
	case <-backendEnded:
		b.cut[idx].Add(1)
	default:
	}
	c.Close()
	up.Close()
	<-done
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
}

// Close stops accepting and cuts every connection.
func (b *Balancer) Close() {
	_ = b.ln.Close()
	b.mu.Lock()
	conns := b.conns
	b.conns = nil
	b.mu.Unlock()
	for c := range conns {
		c.Close()
	}
	b.wg.Wait()
}
