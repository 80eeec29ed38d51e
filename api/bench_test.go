package api_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/api"
	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/memory"
)

// The benchmarks run the API behind a real http.Server on 127.0.0.1 and
// load it with raw HTTP/1.1 over keep-alive TCP connections, each sending
// benchWindow requests at a time (pipelined) and reading their answers, so
// that the client costs little next to the server. One subscriber (a
// counting transport) listens on the topic; a run ends when it has received
// every message. Besides the rates, each reports the CPU time the whole
// process (server, backend, embedded NATS and load) spent per message,
// which a machine shared with other work disturbs less than the rates. Run:
//
//	go test -run '^$' -bench . -benchtime 200000x ./api/
const (
	benchConns  = 8
	benchWindow = 16
)

// BenchmarkPublish: single publishes, one per request, on the memory
// backend and on embedded NATS. (The handler this package replaced,
// fabric.PublishHandler, measured on the same harness before its removal:
// see docs/api.md.)
func BenchmarkPublish(b *testing.B) {
	body := `{"topic":"bench","event":"tick","data":{"n":1,"text":"hello"}}`
	for _, backend := range []string{"memory", "nats"} {
		for _, handler := range []string{"api"} {
			b.Run(backend+"/"+handler, func(b *testing.B) {
				e := newBenchEnv(b, backend, handler)
				e.run(b, body, 1)
			})
		}
	}
}

// BenchmarkPublishNetHTTPClient: single publishes from net/http clients
// (one keep-alive connection each, one request at a time): what a Go
// caller sees, the client sharing the machine.
func BenchmarkPublishNetHTTPClient(b *testing.B) {
	body := `{"topic":"bench","event":"tick","data":{"n":1,"text":"hello"}}`
	for _, backend := range []string{"memory", "nats"} {
		b.Run(backend, func(b *testing.B) {
			e := newBenchEnv(b, backend, "api")
			e.runNetHTTP(b, body)
		})
	}
}

// BenchmarkBatch: batches of 100 and 1000 messages per request.
func BenchmarkBatch(b *testing.B) {
	for _, size := range []int{100, 1000} {
		var sb strings.Builder
		sb.WriteString(`{"messages":[`)
		for i := range size {
			if i > 0 {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, `{"topic":"bench","event":"tick","data":{"n":%d,"text":"hello"}}`, i)
		}
		sb.WriteString(`]}`)
		for _, backend := range []string{"memory", "nats"} {
			b.Run(fmt.Sprintf("%s/size=%d", backend, size), func(b *testing.B) {
				e := newBenchEnv(b, backend, "api")
				e.run(b, sb.String(), size)
			})
		}
	}
}

// benchEnv is a node with one subscriber, served over HTTP.
type benchEnv struct {
	addr, path string
	got        *atomic.Int64
}

type countingTransport struct{ n *atomic.Int64 }

func (t countingTransport) Deliver(*fabric.Message) bool { t.n.Add(1); return true }
func (countingTransport) Close(int, string)              {}

func newBenchEnv(b *testing.B, backend, handler string) *benchEnv {
	b.Helper()
	var broker fabric.Broker
	switch backend {
	case "memory":
		m := memory.New(memory.Options{})
		b.Cleanup(func() { _ = m.Close() })
		broker = m.Broker()
	case "nats":
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv, err := embed.Start(ctx, embed.Options{DataDir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(srv.Shutdown)
		nc, err := srv.Connect()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(nc.Close)
		broker = jetstream.NewBroker(nc, jetstream.BrokerOptions{})
	}
	b.Cleanup(func() { _ = broker.Close() })
	node, err := fabric.NewNode(fabric.Config{Broker: broker})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = node.Close() })
	e := &benchEnv{got: new(atomic.Int64), path: "/api/publish"}
	if err := node.Subscribe(node.Connect(countingTransport{e.got}, nil, "bench"), "bench"); err != nil {
		b.Fatal(err)
	}
	mux := http.NewServeMux()
	switch handler {
	case "api":
		mux.Handle("/api/", api.New(api.Options{Node: node, MaxBatch: 10000}))
	}
	if strings.HasPrefix(b.Name(), "BenchmarkBatch") {
		e.path = "/api/batch"
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	b.Cleanup(func() { _ = srv.Close(); <-done })
	e.addr = l.Addr().String()
	return e
}

// run sends b.N requests with body, each carrying perRequest messages, and
// waits until the subscriber has them all.
func (e *benchEnv) run(b *testing.B, body string, perRequest int) {
	req := []byte(fmt.Sprintf("POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		e.path, len(body), body))
	conns := make([]net.Conn, benchConns)
	for i := range conns {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	// Warm up each connection (and the server's buffers) with one request.
	for _, c := range conns {
		if err := roundTrip(c, bufio.NewReader(c), req, 1); err != nil {
			b.Fatal(err)
		}
	}
	start0 := e.got.Load()
	b.ReportAllocs()
	b.ResetTimer()
	started, cpu0 := time.Now(), processCPU()
	var wg sync.WaitGroup
	errs := make(chan error, len(conns))
	for i, c := range conns {
		n := b.N / len(conns)
		if i < b.N%len(conns) {
			n++
		}
		wg.Go(func() {
			r := bufio.NewReaderSize(c, 64<<10)
			batch := bytes.Repeat(req, benchWindow)
			for n > 0 {
				k := min(n, benchWindow)
				if err := roundTrip(c, r, batch[:k*len(req)], k); err != nil {
					errs <- err
					return
				}
				n -= k
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	e.await(b, start0+int64(b.N*perRequest))
	elapsed := time.Since(started)
	reportCPU(b, processCPU()-cpu0, b.N*perRequest)
	if perRequest == 1 {
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "publishes/s")
	} else {
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "requests/s")
		b.ReportMetric(float64(b.N*perRequest)/elapsed.Seconds(), "messages/s")
	}
}

// runNetHTTP sends b.N publishes from benchConns*benchWindow goroutines
// sharing a net/http client, and waits until the subscriber has them all.
func (e *benchEnv) runNetHTTP(b *testing.B, body string) {
	workers := benchConns * benchWindow
	tr := &http.Transport{MaxIdleConnsPerHost: workers, MaxConnsPerHost: workers, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	url := "http://" + e.addr + e.path
	send := func() error {
		resp, err := client.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	if err := send(); err != nil {
		b.Fatal(err)
	}
	start0 := e.got.Load()
	b.ReportAllocs()
	b.ResetTimer()
	started, cpu0 := time.Now(), processCPU()
	var left atomic.Int64
	left.Store(int64(b.N))
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				if err := send(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	e.await(b, start0+int64(b.N))
	b.ReportMetric(float64(b.N)/time.Since(started).Seconds(), "publishes/s")
	reportCPU(b, processCPU()-cpu0, b.N)
}

// reportCPU reports the process's CPU time per message, when measured.
func reportCPU(b *testing.B, cpu time.Duration, messages int) {
	if cpu > 0 {
		b.ReportMetric(float64(cpu.Microseconds())/float64(messages), "cpu-µs/msg")
	}
}

// await waits until the subscriber has received want messages in all.
func (e *benchEnv) await(b *testing.B, want int64) {
	deadline := time.Now().Add(30 * time.Second)
	for e.got.Load() < want && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := e.got.Load(); got < want {
		b.Fatalf("the subscriber is %d messages short", want-got)
	}
}

// roundTrip writes reqs (k pipelined requests) and reads k answers, each
// of which must be 200.
func roundTrip(c net.Conn, r *bufio.Reader, reqs []byte, k int) error {
	if _, err := c.Write(reqs); err != nil {
		return err
	}
	for range k {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
			return fmt.Errorf("answer %q", line)
		}
		length := -1
		for {
			h, err := r.ReadSlice('\n')
			if err != nil {
				return err
			}
			if len(h) <= 2 {
				break
			}
			if name, value, ok := bytes.Cut(h, []byte(":")); ok && bytes.EqualFold(name, []byte("Content-Length")) {
				if length, err = strconv.Atoi(string(bytes.TrimSpace(value))); err != nil {
					return err
				}
			}
		}
		if length < 0 {
			return errors.New("an answer without Content-Length")
		}
		if _, err := r.Discard(length); err != nil {
			return err
		}
	}
	return nil
}
