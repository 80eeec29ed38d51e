package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

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
