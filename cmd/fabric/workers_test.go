package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/gobwas/ws"
)

// TestWorkersArgs: --workers takes a count with or without '=', or none
// (one per CPU); the hidden worker flag is not a setting.
func TestWorkersArgs(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string
	}{
		{[]string{"--workers", "2", "--listen", ":1"}, []string{"--workers=2", "--listen", ":1"}},
		{[]string{"--workers", "--listen", ":1"}, []string{"--workers", "--listen", ":1"}},
		{[]string{"-workers", "3"}, []string{"-workers=3"}},
		{[]string{"--", "--workers", "2"}, []string{"--", "--workers", "2"}},
	} {
		if got := joinWorkersArg(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("joinWorkersArg(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"--workers=2"}, 2},
		{[]string{"--workers"}, -1},
		{[]string{"--workers=0"}, 0},
		{nil, 0},
	} {
		cfg, _, err := parseServe(tc.args)
		if err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if tc.want < 0 && cfg.Workers.Count < 1 || tc.want >= 0 && cfg.Workers.Count != tc.want {
			t.Errorf("%q: %d workers, want %d (-1: one per CPU)", tc.args, cfg.Workers.Count, tc.want)
		}
	}
	for _, s := range settings {
		if s.flag == strings.TrimPrefix(workerFlag, "--") {
			t.Errorf("the hidden %s flag is a setting", workerFlag)
		}
	}
}

// workersUnder returns the primary's worker pids once there are n of them
// and none of except is among them.
func workersUnder(t *testing.T, p *proc, n int, except []int, within time.Duration, what string) ([]int, time.Duration) {
	t.Helper()
	start := time.Now()
	var got []int
	fabrictest.WaitFor(t, within, what, func() bool {
		got = children(p.cmd.Process.Pid)
		if len(got) != n {
			return false
		}
		for _, pid := range except {
			if slices.Contains(got, pid) {
				return false
			}
		}
		return true
	})
	return got, time.Since(start)
}

// TestWorkers runs `fabric serve --workers 2` and exercises the
// supervisor end to end: a worker killed with SIGKILL is restarted (after
// the backoff) and its clients reconnect; a hung worker (SIGSTOP) is
// replaced once it leaves a health check unanswered for the timeout
// (shortened to 2s here); SIGHUP replaces both workers while clients dial
// without pause, and no dial fails; SIGTERM closes every WebSocket with
// 1001 and the primary exits 0.
func TestWorkers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts worker processes")
	}
	addr := fabrictest.FreeAddr(t)
	p := launchBin(t, serverBinary(t), addr, "--data", t.TempDir(), "--workers", "2", "--worker-health-interval", "250ms",
		"--worker-health-timeout", "2s", "--worker-drain-grace", "300ms", "--shutdown-timeout", "5s", "--log-level", "info",
		"--replay", "feed:*", "--subject-prefix", fmt.Sprintf("wk%d", time.Now().UnixNano()%1e6))
	p.waitReady(t)
	pids, _ := workersUnder(t, p, 2, nil, 30*time.Second, "two workers")
	// Both workers ready: with SO_REUSEPORT either may answer.
	fabrictest.WaitFor(t, 30*time.Second, "both workers serving", func() bool {
		for range 20 {
			if status, _ := readyz(addr); status != http.StatusOK {
				return false
			}
		}
		return true
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	recv := make([]*receiver, 20)
	for i := range recv {
		recv[i] = newReceiver(t, ctx, "ws://"+addr+"/ws", "feed:w")
	}
	publishAndCheck := func(step string) {
		t.Helper()
		seq := publishOne(t, "http://"+addr, "feed:w")
		fabrictest.WaitFor(t, 30*time.Second, step+": every client has the message", func() bool {
			for _, r := range recv {
				if r.last() < seq {
					return false
				}
			}
			return true
		})
		stored := historyOf(t, "http://"+addr, "feed:w")
		for i, r := range recv {
			if msg := checkSequence(r.got(), stored); msg != "" {
				t.Errorf("%s: client %d: %s", step, i, msg)
			}
		}
	}
	publishAndCheck("start")
	reconnects := func() int {
		n := 0
		for _, r := range recv {
			n += r.c.Connections() - 1
		}
		return n
	}

	// SIGKILL a worker: restarted after the backoff; its clients reconnect.
	victim, survivor := pids[0], pids[1]
	killed := time.Now()
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	pids, _ = workersUnder(t, p, 2, []int{victim}, 30*time.Second, "the killed worker replaced")
	took := time.Since(killed)
	t.Logf("SIGKILL: worker %d replaced after %s (workers now %v)", victim, took.Round(time.Millisecond), pids)
	if took < 100*time.Millisecond {
		t.Errorf("restarted %s after the kill, before the 100ms backoff", took)
	}
	fabrictest.WaitFor(t, 30*time.Second, "clients of the killed worker reconnected", func() bool { return reconnects() > 0 })
	publishAndCheck("after SIGKILL")
	t.Logf("SIGKILL: %d clients reconnected", reconnects())

	// SIGSTOP a worker: replaced after the health timeout. The survivor of
	// the kill is the one sure to hold clients (most of the killed one's
	// reconnected to it while its slot restarted).
	before := reconnects()
	hung := survivor
	stopped := time.Now()
	if err := syscall.Kill(hung, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	pids, _ = workersUnder(t, p, 2, []int{hung}, 30*time.Second, "the hung worker replaced")
	took = time.Since(stopped)
	t.Logf("SIGSTOP: worker %d replaced after %s (workers now %v)", hung, took.Round(time.Millisecond), pids)
	if took < 2*time.Second {
		t.Errorf("hung worker replaced after %s, before the 2s health timeout", took)
	}
	fabrictest.WaitFor(t, 30*time.Second, "clients of the hung worker reconnected", func() bool { return reconnects() > before })
	publishAndCheck("after SIGSTOP")

	// SIGHUP: both workers replaced one by one while clients dial without
	// pause; no dial fails.
	var dials, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				dials.Add(1)
				dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
				var body string
				d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Origin": {"http://" + addr}}),
					OnStatusError: func(status int, reason []byte, resp io.Reader) {
						b, _ := io.ReadAll(io.LimitReader(resp, 512))
						body = fmt.Sprintf("%d %s: %q", status, reason, b)
					}}
				c, _, _, err := d.Dial(dctx, "ws://"+addr+"/ws")
				dcancel()
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Errorf("%w (%s)", err, body))
					continue
				}
				c.Close()
			}
		})
	}
	before = reconnects()
	old := pids
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	pids, took = workersUnder(t, p, 2, old, 60*time.Second, "both workers replaced by the roll")
	time.Sleep(300 * time.Millisecond) // dials against the new workers only (load, not a wait)
	close(stop)
	wg.Wait()
	t.Logf("SIGHUP: workers %v replaced by %v in %s; %d dials, %d failed", old, pids, took.Round(time.Millisecond), dials.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d of %d dials failed during the roll, first: %v", failed.Load(), dials.Load(), firstErr.Load())
		t.Logf("primary's log:\n%s", p.out)
	}
	fabrictest.WaitFor(t, 30*time.Second, "clients of the rolled workers reconnected", func() bool { return reconnects() >= before+len(recv) })
	publishAndCheck("after SIGHUP")

	// SIGTERM: every WebSocket gets 1001, the primary exits 0.
	var plain []*wsclient.Client
	for range 6 {
		c, err := wsclient.Dial(ctx, "ws://"+addr+"/ws", wsclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Subscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		plain = append(plain, c)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for i, c := range plain {
		if _, err := c.Next(ctx); err != wsclient.ErrClosed {
			t.Fatalf("client %d: %v, want the connection closed", i, err)
		}
		if code, reason := c.CloseCode(); code != 1001 {
			t.Errorf("client %d: close code %d %q, want 1001", i, code, reason)
		}
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("primary exit: %v\n%s", err, p.out)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("primary still running 30s after SIGTERM\n%s", p.out)
	}
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Errorf("worker %d left behind", pid)
		}
	}
}
