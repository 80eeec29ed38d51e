package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

var fabricBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fabric-bin")
	if err != nil {
		panic(err)
	}
	fabricBin = filepath.Join(dir, "fabric")
	out, err := exec.Command("go", "build", "-race", "-o", fabricBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build fabric: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// syncBuffer is a bytes.Buffer safe to read while a process writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// proc is a `fabric serve` child process.
type proc struct {
	cmd    *exec.Cmd
	addr   string
	out    *syncBuffer
	done   chan error    // the exit status, once
	exited chan struct{} // closed when the process has exited
}

// startProc starts `fabric serve` and waits until it is ready.
func startProc(t *testing.T, addr string, args ...string) *proc {
	t.Helper()
	p := launchProc(t, addr, args...)
	p.waitReady(t)
	return p
}

// launchProc starts `fabric serve` without waiting (cluster members are
// only ready once enough of them run).
func launchProc(t *testing.T, addr string, args ...string) *proc {
	t.Helper()
	args = append([]string{"serve", "--listen", addr, "--data", t.TempDir(), "--log-level", "warn"}, args...)
	p := &proc{cmd: exec.Command(fabricBin, args...), addr: addr, out: &syncBuffer{}, done: make(chan error, 1), exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.done <- p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

// waitReady waits until the process answers /readyz with 200.
func (p *proc) waitReady(t *testing.T) {
	t.Helper()
	fabrictest.WaitFor(t, 60*time.Second, "fabric serve to be ready", func() bool {
		resp, err := http.Get("http://" + p.addr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func TestGracefulShutdown(t *testing.T) {
	p := startProc(t, fabrictest.FreeAddr(t), "--shutdown-timeout", "10s")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var clients []*wsclient.Client
	for range 5 {
		c, err := wsclient.Dial(ctx, "ws://"+p.addr+"/ws", wsclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Subscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		if _, err := c.Next(ctx); err != wsclient.ErrClosed {
			t.Fatalf("client %d: %v, want the connection closed", i, err)
		}
		if code, reason := c.CloseCode(); code != 1001 {
			t.Fatalf("client %d got close code %d %q, want 1001 Going Away", i, code, reason)
		}
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, p.out)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("still running 15s after SIGTERM\n%s", p.out)
	}
	t.Logf("shutdown with 5 clients took %s", time.Since(start))
}

func TestReusePort(t *testing.T) {
	addr := fabrictest.FreeAddr(t)
	startProc(t, addr, "--reuseport")
	startProc(t, addr, "--reuseport")
	seen := map[string]int{}
	for range 200 {
		tr := &http.Transport{DisableKeepAlives: true}
		resp, err := (&http.Client{Transport: tr}).Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		var h struct{ Instance string }
		_ = json.NewDecoder(resp.Body).Decode(&h)
		resp.Body.Close()
		seen[h.Instance]++
		if len(seen) == 2 {
			break
		}
	}
	if len(seen) != 2 {
		t.Fatalf("only one process answered on the shared port: %v", seen)
	}
}

func TestSecondInstanceOnSameDataDirRefused(t *testing.T) {
	dir := t.TempDir()
	p := startProc(t, fabrictest.FreeAddr(t), "--data", dir)
	cmd := exec.Command(fabricBin, "serve", "--listen", fabrictest.FreeAddr(t), "--data", dir)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatal("second instance on the same data dir started")
	}
	if !strings.Contains(string(out), "in use by another Fabric instance") {
		t.Fatalf("unclear error:\n%s", out)
	}
	_ = p
}

func TestUsageAndVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"serve", "--help"}, &out, &errb); code != 0 {
		t.Fatalf("serve --help exit %d", code)
	}
	var cfg config
	fs := serveFlags(&cfg)
	fs.VisitAll(func(f *flag.Flag) {
		if !strings.Contains(out.String(), "--"+f.Name) || !strings.Contains(out.String(), envName(f.Name)) {
			t.Errorf("--help does not document --%s and %s", f.Name, envName(f.Name))
		}
	})
	out.Reset()
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "fabric ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	if code := run([]string{"serve", "--no-such-flag"}, &out, &errb); code != 2 {
		t.Fatalf("unknown flag exit %d, want 2", code)
	}
	if code := run([]string{"bogus"}, &out, &errb); code != 2 {
		t.Fatalf("unknown command exit %d, want 2", code)
	}
}

func TestEnvTwins(t *testing.T) {
	t.Setenv("FABRIC_LISTEN", "127.0.0.1:1234")
	t.Setenv("FABRIC_IDLE_TIMEOUT", "7s")
	var cfg config
	if err := serveFlags(&cfg).parse([]string{"--idle-timeout", "9s"}); err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:1234" {
		t.Errorf("FABRIC_LISTEN ignored: %q", cfg.Listen)
	}
	if cfg.IdleTimeout != 9*time.Second {
		t.Errorf("command line should win over the environment: %s", cfg.IdleTimeout)
	}
	t.Setenv("FABRIC_MAX_PAYLOAD", "lots")
	if err := serveFlags(&cfg).parse(nil); err == nil || !strings.Contains(err.Error(), "FABRIC_MAX_PAYLOAD") {
		t.Errorf("bad env value: %v", err)
	}
}

// TestHTTPAPI runs the server in process and checks every API answer.
func TestHTTPAPI(t *testing.T) {
	cfg := testConfig(t)
	cfg.APIKey = "s3cret"
	s, err := start(context.Background(), cfg, fabrictest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	base := "http://" + s.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe(ctx, "orders"); err != nil {
		t.Fatal(err)
	}
	post := func(body, key string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, base+"/api/publish", strings.NewReader(body))
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tc := range []struct {
		name, body, key string
		status          int
	}{
		{"no key", `{"topic":"orders","event":"e","data":1}`, "", 401},
		{"wrong key", `{"topic":"orders","event":"e","data":1}`, "nope", 401},
		{"bad json", `{"topic":`, "s3cret", 400},
		{"bad topic", `{"topic":"a\u0001","event":"e"}`, "s3cret", 400},
		{"reserved topic", `{"topic":"__rpc","event":"e"}`, "s3cret", 400},
		{"no event", `{"topic":"orders"}`, "s3cret", 400},
		{"too big", `{"topic":"orders","event":"e","data":"` + strings.Repeat("x", 2<<20) + `"}`, "s3cret", 413},
		{"ok", `{"topic":"orders","event":"created","data":{"id":7}}`, "s3cret", 200},
	} {
		status, body := post(tc.body, tc.key)
		if status != tc.status {
			t.Errorf("%s: status %d %s, want %d", tc.name, status, body, tc.status)
		}
		if !json.Valid([]byte(body)) {
			t.Errorf("%s: body is not JSON: %q", tc.name, body)
		}
	}
	e, err := c.Next(ctx)
	if err != nil || e.Event != "created" || string(e.Data) != `{"id":7}` {
		t.Fatalf("subscriber got %+v %v", e, err)
	}
	resp, err := http.Get(base + "/api/publish")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET /api/publish: %d", resp.StatusCode)
	}
	resp, err = http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"fabric_connections 1", "fabric_subscriptions 1", "fabric_messages_out_total", "fabric_bytes_out_total", "fabric_messages_in_total", "fabric_publishes_total 1"} {
		if !bytes.Contains(m, []byte(name)) {
			t.Errorf("/metrics lacks %q", name)
		}
	}
}

// TestAPIWithoutKeyIsLoopbackOnly checks the rule for servers without --api-key.
func TestAPIWithoutKeyIsLoopbackOnly(t *testing.T) {
	cfg := testConfig(t)
	s, err := start(context.Background(), cfg, fabrictest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	h := s.node.PublishHandler(fabric.APIOptions{Key: cfg.APIKey})
	for _, tc := range []struct {
		remote string
		status int
	}{{"10.1.2.3:5555", 403}, {"[2001:db8::1]:5555", 403}, {"127.0.0.1:5555", 200}, {"[::1]:5555", 200}} {
		req := httptest.NewRequest(http.MethodPost, "/api/publish", strings.NewReader(`{"topic":"t","event":"e"}`))
		req.RemoteAddr = tc.remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.status {
			t.Errorf("from %s: %d, want %d", tc.remote, rec.Code, tc.status)
		}
	}
	// and over a real socket from loopback
	resp, err := http.Post("http://"+s.Addr()+"/api/publish", "application/json", strings.NewReader(`{"topic":"t","event":"e"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("loopback publish without key: %d", resp.StatusCode)
	}
}

func testConfig(t *testing.T) config {
	var cfg config
	if err := serveFlags(&cfg).parse(nil); err != nil {
		t.Fatal(err)
	}
	cfg.Listen = "127.0.0.1:0"
	cfg.DataDir = t.TempDir()
	return cfg
}
