package main

// The broadcast latency floor, measured in the same run as the broadcast.
//
// One message to N WebSocket subscribers is at least N write(2) calls (TCP
// has no multicast), so the last subscriber cannot have it before the
// server has made N writes. Before any client connects, the tool measures
// what one write of a 180-byte frame (a 128-byte payload in Fabric's
// envelope) to a loopback TCP socket costs here, the sockets taken in
// turn as a broadcast does and their peers drained by a poller that never
// sleeps in their wait queues (as wsedge's BenchmarkLoopbackWrite does).
// After the run:
//
//	floor = N × write cost ÷ (cores − the load tool's CPU in the window)
//
// the time one pass of writes takes on the cores the load tool leaves to
// the server (the tool reads the same N sockets on the same machine), and
// p99 ÷ floor says how far above that the broadcast's p99 is. The floor
// leaves out everything but the writes (the server's own work per
// message, the wake-ups of blocked readers), so it is a lower bound.

import (
	"fmt"
	"math"
	"net"
	"runtime"
	"syscall"
	"time"
)

// Floor measurement settings: the frame size of a 128-byte payload in
// Fabric's envelope, as many socket pairs as the benchmark in wsedge, and
// enough writes for a stable mean.
const (
	floorFrame  = 180
	floorPairs  = 1000
	floorWrites = 200_000
)

// floor is the broadcast's latency floor and how its p99 compares.
type floor struct {
	WriteNS     float64 `json:"write_ns"`
	FrameBytes  int     `json:"frame_bytes"`
	Subscribers int     `json:"subscribers"`
	ServerCores float64 `json:"server_cores"`
	FloorMS     float64 `json:"floor_ms"`
	P99Ratio    float64 `json:"p99_over_floor"`
}

// complete computes the floor from the run's connections, cores and tool
// CPU, and the ratio of its p99.
func (f *floor) complete(r *result) {
	f.Subscribers = r.Conns
	// The tool keeps at least a tenth of a core for the server in the
	// formula, whatever it used.
	f.ServerCores = math.Max(0.1, float64(r.Cores)-r.ToolCPU/100)
	f.FloorMS = round2(float64(f.Subscribers) * f.WriteNS / f.ServerCores / 1e6)
	if f.FloorMS > 0 {
		f.P99Ratio = round2(r.Latency.P99 / f.FloorMS)
	}
	f.ServerCores = round2(f.ServerCores)
	f.WriteNS = math.Round(f.WriteNS)
}

func round2(x float64) float64 { return math.Round(x*100) / 100 }

// measureWriteCost returns the mean wall time of one write of a frame of
// size bytes to one of pairs loopback connections in turn, over writes
// writes, while a poller drains the peers every millisecond.
func measureWriteCost(size, pairs, writes int) (float64, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	var srv, cli []int
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	fd := func(c net.Conn) (int, error) {
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			return -1, err
		}
		out := -1
		_ = rc.Control(func(f uintptr) { out = int(f) })
		return out, nil
	}
	for range pairs {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return 0, err
		}
		s, err := ln.Accept()
		if err != nil {
			c.Close()
			return 0, err
		}
		conns = append(conns, c, s)
		sf, err := fd(s)
		if err != nil {
			return 0, err
		}
		cf, err := fd(c)
		if err != nil {
			return 0, err
		}
		srv, cli = append(srv, sf), append(cli, cf)
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
	frame := make([]byte, size)
	runtime.LockOSThread()
	t0 := time.Now()
	for i := range writes {
		if _, err := syscall.Write(srv[i%pairs], frame); err != nil && err != syscall.EAGAIN {
			runtime.UnlockOSThread()
			close(done)
			<-drained
			return 0, fmt.Errorf("write: %w", err)
		}
	}
	el := time.Since(t0)
	runtime.UnlockOSThread()
	close(done)
	<-drained
	return float64(el.Nanoseconds()) / float64(writes), nil
}
