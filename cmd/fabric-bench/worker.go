package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// workerConfig is what the coordinator tells one worker process.
type workerConfig struct {
	URL         string        `json:"url"`
	Conns       int           `json:"conns"`
	Offset      int           `json:"offset"` // global index of this worker's first connection
	Scenario    string        `json:"scenario"`
	Shared      int           `json:"shared"`
	Concurrency int           `json:"concurrency"`
	SourceIPs   int           `json:"source_ips"`
	Churn       time.Duration `json:"churn"`
	ReadBatch   time.Duration `json:"read_batch"`
	Target      string        `json:"target"`
}

// workerReport is one line a worker writes to the coordinator.
type workerReport struct {
	Type       string   `json:"type"` // ready, stats, final, error
	Conns      int      `json:"conns,omitempty"`
	Failed     int      `json:"failed,omitempty"`
	Elapsed    float64  `json:"elapsed_s,omitempty"`
	Received   uint64   `json:"received"`
	Handshakes uint64   `json:"handshakes,omitempty"`
	Closed     uint64   `json:"closed,omitempty"`
	Hist       []uint64 `json:"hist,omitempty"`
	Error      string   `json:"error,omitempty"`
}

// topicsFor is the subscription plan of global connection i.
func topicsFor(scenario string, i, shared int) []string {
	switch scenario {
	case "fanout-many-topics":
		return []string{"bench:t:" + strconv.Itoa(i), "bench:s:" + strconv.Itoa(i%shared)}
	case "idle":
		return []string{"bench:idle"}
	default: // broadcast, cross-instance
		return []string{"bench:b"}
	}
}

// benchConn is one load connection: a reading goroutine with a small
// buffer, parsing frames in place without allocating.
type benchConn struct {
	nc net.Conn
	br *bufio.Reader
	id int
	st wireState
}

type worker struct {
	cfg      workerConfig
	out      *json.Encoder
	outMu    sync.Mutex
	hist     hist
	received atomic.Uint64
	closed   atomic.Uint64
	hs       atomic.Uint64
	conns    []*benchConn
	mu       sync.Mutex
}

func runWorker() int {
	var cfg workerConfig
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadBytes('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker: no config:", err)
		return 2
	}
	if err := json.Unmarshal(line, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "worker: bad config:", err)
		return 2
	}
	w := &worker{cfg: cfg, out: json.NewEncoder(os.Stdout)}
	stop := make(chan struct{})
	sample := make(chan struct{}, 1)
	go func() { // "sample" asks for stats now; EOF or anything else means stop
		for {
			line, err := in.ReadBytes('\n')
			if err == nil && string(bytes.TrimSpace(line)) == "sample" {
				sample <- struct{}{}
				continue
			}
			close(stop)
			return
		}
	}()
	if cfg.Churn > 0 {
		w.churn(stop)
		return 0
	}
	start := time.Now()
	failed := w.connectAll()
	w.report(workerReport{Type: "ready", Conns: len(w.conns), Failed: failed, Elapsed: time.Since(start).Seconds()})
	if ok, err := startEpollReaders(w, w.conns); !ok {
		if err != nil {
			fmt.Fprintln(os.Stderr, "worker: epoll unavailable, reading with a goroutine per connection:", err)
		}
		for _, c := range w.conns {
			go w.read(c)
		}
	}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			w.report(workerReport{Type: "stats", Received: w.received.Load(), Closed: w.closed.Load(), Hist: w.hist.snapshot()})
		case <-sample:
			w.report(workerReport{Type: "sample", Received: w.received.Load(), Closed: w.closed.Load(), Hist: w.hist.snapshot()})
		case <-stop:
			for _, c := range w.conns {
				c.nc.Close()
			}
			w.report(workerReport{Type: "final", Received: w.received.Load(), Closed: w.closed.Load(), Hist: w.hist.snapshot()})
			return 0
		}
	}
}

func (w *worker) report(r workerReport) {
	w.outMu.Lock()
	defer w.outMu.Unlock()
	_ = w.out.Encode(r)
}

func (w *worker) dialer(i int) ws.Dialer {
	u, _ := url.Parse(w.cfg.URL)
	h := http.Header{"Origin": {"http://" + u.Host}}
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(h), Timeout: 30 * time.Second}
	if w.cfg.SourceIPs > 0 {
		// Spread client addresses over 127.0.0.2 ... so that N connections
		// do not exhaust one address's ephemeral ports.
		s := i % w.cfg.SourceIPs
		ip := net.IPv4(127, 0, byte(s/250), byte(2+s%250))
		nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 30 * time.Second}
		d.NetDial = func(ctx context.Context, n, a string) (net.Conn, error) { return nd.DialContext(ctx, n, a) }
	}
	return d
}

// connectAll opens and subscribes every connection, Concurrency at a time.
func (w *worker) connectAll() int {
	var failed atomic.Int64
	sem := make(chan struct{}, max(1, w.cfg.Concurrency))
	var wg sync.WaitGroup
	for k := range w.cfg.Conns {
		i := w.cfg.Offset + k
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := w.connect(i)
			if err != nil {
				if failed.Add(1) <= 3 {
					fmt.Fprintf(os.Stderr, "worker: connection %d: %v\n", i, err)
				}
				return
			}
			w.mu.Lock()
			w.conns = append(w.conns, c)
			w.mu.Unlock()
		})
	}
	wg.Wait()
	return int(failed.Load())
}

func (w *worker) connect(i int) (*benchConn, error) {
	d := w.dialer(i)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nc, br, _, err := d.Dial(ctx, w.cfg.URL)
	if err != nil {
		return nil, err
	}
	if br == nil {
		br = bufio.NewReaderSize(nc, 4096)
	}
	w.hs.Add(1)
	c := &benchConn{nc: nc, br: br, id: i}
	// Wait for every acknowledgement so publishing starts on a settled set.
	if err := setupConn(w.cfg.Target, nc, br, topicsFor(w.cfg.Scenario, i, max(1, w.cfg.Shared)), &c.st); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// read counts messages and records publish→deliver latency from the "ts"
// (unix nanoseconds) each benchmark payload carries. Frames are peeked
// from the connection's buffer.
func (w *worker) read(c *benchConn) {
	defer w.closed.Add(1)
	var out []byte
	for {
		h, err := ws.ReadHeader(c.br)
		if err != nil {
			return
		}
		n := int(h.Length)
		if h.OpCode == ws.OpPing {
			p, err := c.br.Peek(n)
			if err != nil {
				return
			}
			f := ws.NewPongFrame(bytes.Clone(p))
			_, _ = c.br.Discard(n)
			_ = ws.WriteFrame(c.nc, ws.MaskFrame(f))
			continue
		}
		if (h.OpCode != ws.OpText && h.OpCode != ws.OpBinary && h.OpCode != ws.OpContinuation) || n > c.br.Size() {
			if _, err := c.br.Discard(n); err != nil {
				return
			}
			continue
		}
		p, err := c.br.Peek(n)
		if err != nil {
			return
		}
		out = w.onData(&c.st, c.id, p, time.Now().UnixNano(), out[:0])
		_, _ = c.br.Discard(n)
		if len(out) > 0 {
			if _, err := c.nc.Write(out); err != nil {
				return
			}
		}
	}
}

// churn opens and closes connections for cfg.Churn, Concurrency loops at a
// time, and reports completed handshakes (with their latency in Hist). Each
// handshake is a pre-built upgrade request written straight to TCP and the
// status line read back, so the tool spends as little as possible per
// connection and the server is what gets measured.
func (w *worker) churn(stop <-chan struct{}) {
	u, _ := url.Parse(w.cfg.URL)
	req := []byte("GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://" + u.Host + "\r\n\r\n")
	var closeFrame bytes.Buffer
	_ = ws.WriteFrame(&closeFrame, ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))))
	deadline := time.Now().Add(w.cfg.Churn)
	var wg sync.WaitGroup
	var errs atomic.Uint64
	for g := range max(1, w.cfg.Concurrency) {
		wg.Go(func() {
			buf := make([]byte, 512)
			for i := g; time.Now().Before(deadline); i += w.cfg.Concurrency {
				select {
				case <-stop:
					return
				default:
				}
				t0 := time.Now()
				if err := w.handshake(i, u.Host, req, buf, closeFrame.Bytes()); err != nil {
					if errs.Add(1) <= 3 {
						fmt.Fprintln(os.Stderr, "worker: churn:", err)
					}
					continue
				}
				w.hist.record(g, time.Since(t0))
				w.hs.Add(1)
			}
		})
	}
	wg.Wait()
	w.report(workerReport{Type: "final", Handshakes: w.hs.Load(), Failed: int(errs.Load()), Hist: w.hist.snapshot()})
}

// handshake dials, upgrades (checking for 101) and closes one connection.
func (w *worker) handshake(i int, host string, req, buf, closeFrame []byte) error {
	nd := net.Dialer{Timeout: 10 * time.Second}
	if w.cfg.SourceIPs > 0 {
		s := (w.cfg.Offset + i) % w.cfg.SourceIPs
		nd.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, byte(s/250), byte(2+s%250))}
	}
	nc, err := nd.Dial("tcp", host)
	if err != nil {
		return err
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := nc.Write(req); err != nil {
		return err
	}
	n := 0
	for !bytes.Contains(buf[:n], []byte("\r\n\r\n")) {
		if n == len(buf) {
			return fmt.Errorf("oversized handshake response")
		}
		m, err := nc.Read(buf[n:])
		if err != nil {
			return err
		}
		n += m
	}
	if !bytes.HasPrefix(buf[:n], []byte("HTTP/1.1 101")) {
		return fmt.Errorf("%w: %.40q", errNoUpgrade, buf[:n])
	}
	if w.cfg.Target != targetFabric {
		// The peer's own connect exchange, on the bytes after the headers.
		end := bytes.Index(buf[:n], []byte("\r\n\r\n")) + 4
		br := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(buf[end:n])), nc), 1024)
		if err := churnGreeting(w.cfg.Target, nc, br); err != nil {
			return err
		}
	}
	_, err = nc.Write(closeFrame)
	return err
}
