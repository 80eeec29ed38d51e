package server

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// hardened is a memory-backend server with short HTTP limits.
func hardened(t *testing.T, mod func(*HTTPOptions)) *Server {
	o := testOptions(t)
	o.Backend = BackendMemory
	o.HTTP.ReadHeaderTimeout = 2 * time.Second
	o.HTTP.BodyTimeout = 2 * time.Second
	o.HTTP.WriteTimeout = 2 * time.Second
	o.HTTP.IdleTimeout = 2 * time.Second
	if mod != nil {
		mod(&o.HTTP)
	}
	return startServer(t, o)
}

// parallel runs f(i) for i in [0, n) on at most limit goroutines.
func parallel(n, limit int, f func(i int)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, limit)
	for i := range n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f(i)
		}()
	}
	wg.Wait()
}

// TestIdleKeepAliveConnectionsClosed: 2,000 keep-alive connections that
// made one request and went quiet are closed by the server within the
// idle timeout, and the goroutines serving them go away.
func TestIdleKeepAliveConnectionsClosed(t *testing.T) {
	const n, idle = 2000, time.Second
	s := hardened(t, func(h *HTTPOptions) { h.IdleTimeout = idle })
	base := runtime.NumGoroutine()
	conns := make([]net.Conn, n)
	served := make([]time.Time, n)
	var errMu sync.Mutex
	var firstErr error
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
	}
	parallel(n, 64, func(i int) {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			fail(err)
			return
		}
		conns[i] = c
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			fail(err)
			return
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			fail(err)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		served[i] = time.Now()
		if resp.StatusCode != 200 || resp.Close {
			fail(io.ErrUnexpectedEOF)
		}
	})
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	t.Logf("%d goroutines with %d connections open (%d before)", runtime.NumGoroutine(), n, base)
	// Each connection must see EOF within the idle timeout of its request
	// (and some slack for a loaded machine). One reader per connection, all
	// at once; a connection whose EOF came while the others were still
	// being opened has it waiting.
	const slack = 3 * time.Second
	var late int
	var worst time.Duration
	var mu sync.Mutex
	var wg sync.WaitGroup
	waitFrom := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.SetReadDeadline(maxTime(served[i].Add(idle+slack), waitFrom.Add(slack)))
			_, err := c.Read(make([]byte, 1))
			took := time.Since(served[i])
			c.Close()
			mu.Lock()
			defer mu.Unlock()
			if err != io.EOF {
				late++
				if late == 1 {
					t.Errorf("connection %d: %v after %s, want EOF within %s", i, err, took, idle)
				}
			}
			worst = max(worst, took)
		}()
	}
	wg.Wait()
	if late > 0 {
		t.Fatalf("%d of %d idle connections not closed in time", late, n)
	}
	t.Logf("%d idle connections closed, the last %s after its request (idle timeout %s)", n, worst, idle)
	fabrictest.WaitFor(t, 10*time.Second, "the connections' goroutines to end", func() bool {
		return runtime.NumGoroutine() <= base+10
	})
}

// TestSlowBodiesCut: 200 requests whose bodies trickle in at 2 bytes a
// second, to the API and to the streaming endpoints (which do not read
// them), are answered and their connections closed within the body
// deadline, not held open.
func TestSlowBodiesCut(t *testing.T) {
	const n, deadline = 200, time.Second
	s := hardened(t, func(h *HTTPOptions) { h.BodyTimeout = deadline })
	paths := []string{"/api/publish", "/ws", "/events", "/nowhere"}
	start := time.Now()
	var mu sync.Mutex
	var worst time.Duration
	var bad []string
	parallel(n, n, func(i int) {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			mu.Lock()
			bad = append(bad, err.Error())
			mu.Unlock()
			return
		}
		defer c.Close()
		began := time.Now()
		_, _ = io.WriteString(c, "POST "+paths[i%len(paths)]+" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { // 2 B/s
			defer wg.Done()
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := io.WriteString(c, `"a`); err != nil {
						return
					}
				}
			}
		}()
		// Read whatever the server says until it closes the connection.
		_ = c.SetReadDeadline(began.Add(deadline + 5*time.Second))
		_, err = io.Copy(io.Discard, c)
		took := time.Since(began)
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		worst = max(worst, took)
		if isTimeout(err) {
			bad = append(bad, paths[i%len(paths)]+": still open after "+took.String())
		}
	})
	if len(bad) > 0 {
		t.Fatalf("%d of %d slow bodies not cut in time, e.g. %s", len(bad), n, bad[0])
	}
	if worst > deadline+3*time.Second {
		t.Fatalf("the slowest cut took %s, deadline %s", worst, deadline)
	}
	t.Logf("%d slow bodies cut, the last after %s (deadline %s, all within %s)", n, worst, deadline, time.Since(start))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestMaxRequests: past the cap, requests get 503 with Retry-After at once;
// probes and streams are not counted; the cap frees as requests end.
func TestMaxRequests(t *testing.T) {
	const max = 4
	s := hardened(t, func(h *HTTPOptions) { h.MaxRequests = max })
	release := make(chan struct{})
	entered := make(chan struct{}, 2*max)
	if err := s.Handle(Route{Pattern: "/slow", Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-release
		w.WriteHeader(http.StatusNoContent)
	})}); err != nil {
		t.Fatal(err)
	}
	base := "http://" + s.Addr()
	var wg sync.WaitGroup
	for range max {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(base + "/slow")
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNoContent {
				t.Errorf("slow request: %d", resp.StatusCode)
			}
		}()
	}
	for range max {
		<-entered
	}
	began := time.Now()
	resp, err := http.Get(base + "/slow")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("request past the cap: %d %q Retry-After %q", resp.StatusCode, body, resp.Header.Get("Retry-After"))
	}
	if took := time.Since(began); took > time.Second {
		t.Errorf("the 503 took %s", took)
	}
	if status, _ := get(t, base+"/readyz"); status != 200 {
		t.Errorf("/readyz at the cap: %d", status)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := dial(t, ctx, s, wsclient.Options{}) // streams are not requests
	if err := c.Subscribe(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	_, m := get(t, base+"/metrics")
	if !strings.Contains(m, "fabric_http_requests_refused_total 1") || !strings.Contains(m, "fabric_http_requests_in_flight 4") {
		t.Errorf("/metrics at the cap lacks the refusal or the requests in flight:\n%s", grepLines(m, "fabric_http_"))
	}
	close(release)
	wg.Wait()
	if status, _ := get(t, base+"/slow"); status != http.StatusNoContent {
		t.Fatalf("after the cap freed: %d", status)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestStreamsOutliveDeadlines: a WebSocket, an SSE stream and a Stream
// route keep working past the body and write deadlines, which do cut an
// ordinary slow response.
func TestStreamsOutliveDeadlines(t *testing.T) {
	const d = 300 * time.Millisecond
	s := hardened(t, func(h *HTTPOptions) { h.BodyTimeout, h.WriteTimeout, h.IdleTimeout = d, d, d })
	ticks := func() http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			t := time.NewTicker(d / 2)
			defer t.Stop()
			for i := range 8 { // 4 deadlines long
				if _, err := io.WriteString(w, "tick\n"); err != nil {
					return
				}
				if err := rc.Flush(); err != nil {
					return
				}
				if i < 7 {
					select {
					case <-t.C:
					case <-r.Context().Done():
						return
					}
				}
			}
		})
	}
	for p, stream := range map[string]bool{"/stream": true, "/slow": false} {
		if err := s.Handle(Route{Pattern: p, Handler: ticks(), Stream: stream}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws := dial(t, ctx, s, wsclient.Options{})
	es, err := wsclient.Dial(ctx, "http://"+s.Addr()+"/events", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer es.Close()
	for _, c := range []*wsclient.Client{ws, es} {
		if err := c.Subscribe(ctx, "t"); err != nil {
			t.Fatal(err)
		}
	}
	count := func(path string) int {
		resp, err := http.Get("http://" + s.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body) // a cut response ends early
		return strings.Count(string(b), "tick")
	}
	if n := count("/stream"); n != 8 {
		t.Errorf("stream route: %d ticks of 8", n)
	}
	if n := count("/slow"); n >= 8 {
		t.Errorf("ordinary route: %d ticks, want it cut by the write deadline", n)
	}
	// Both transports still deliver, well past every deadline.
	if _, err := s.Node().Publish(ctx, "t", "late", 1); err != nil {
		t.Fatal(err)
	}
	for i, c := range []*wsclient.Client{ws, es} {
		e, err := c.Next(ctx)
		if err != nil || e.Event != "late" {
			t.Fatalf("client %d after the deadlines: %+v %v", i, e, err)
		}
	}
}
