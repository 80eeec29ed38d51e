package wsedge

import (
	"net"
	"syscall"
	"testing"
	"time"
)

// BenchmarkLoopbackWrite measures the floor under every fan-out figure: one
// write(2) of a 180-byte frame (a 128-byte payload in its envelope) to a
// loopback TCP socket, the sockets taken in turn as a broadcast does, with
// the peers drained by a poller that never sleeps in their wait queues. A
// broadcast to N connections costs at least N times this in CPU.
func BenchmarkLoopbackWrite(b *testing.B) {
	const n = 1000
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var srv, cli []int
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	fd := func(c net.Conn) int {
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			b.Fatal(err)
		}
		var out int
		_ = rc.Control(func(f uintptr) { out = int(f) })
		return out
	}
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c, s)
		srv, cli = append(srv, fd(s)), append(cli, fd(c))
	}
	done := make(chan struct{})
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		buf := make([]byte, 1<<16)
		for {
			select {
			case <-done:
				return
			default:
			}
			for _, f := range cli {
				_, _ = syscall.Read(f, buf)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	frame := make([]byte, 180)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := syscall.Write(srv[i%n], frame); err != nil && err != syscall.EAGAIN {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	close(done)
	<-drained
}
