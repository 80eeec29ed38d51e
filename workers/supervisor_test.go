package workers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary is its own worker: with FABRIC_WORKERS_HELPER set, TestMain
// runs helperWorker instead of the tests.
func TestMain(m *testing.M) {
	if mode := os.Getenv("FABRIC_WORKERS_HELPER"); mode != "" {
		os.Exit(helperWorker(mode))
	}
	os.Exit(m.Run())
}

// helperWorker is a worker: "crash" exits at once; "serve" answers HTTP on
// its inherited listener with its pid and drains on SIGTERM.
func helperWorker(mode string) int {
	w, err := Attach(5 * time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	if mode == "crash" {
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(rw, os.Getpid())
	})}
	var ready atomic.Bool
	go func() {
		_ = w.Serve(func() Health {
			if ready.Load() {
				w.StartAccepting()
			}
			return Health{Ready: ready.Load()}
		})
	}()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(w.Listeners()[0]) }()
	ready.Store(true)
	select {
	case <-ctx.Done():
	case <-w.Done():
	}
	w.StopAccepting()
	time.Sleep(100 * time.Millisecond) // what fabric serve's workers do: DrainGrace
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	<-served
	return 0
}

// slotListeners binds n SO_REUSEPORT sockets on one loopback port and
// returns the port and one file per slot.
func slotListeners(t *testing.T, n int) (string, [][]*os.File) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	addr := "127.0.0.1:0"
	files := make([][]*os.File, n)
	for i := range n {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		addr = ln.Addr().String()
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
		files[i] = []*os.File{f}
	}
	return addr, files
}

func helperCommand(mode string) func(int) (*exec.Cmd, error) {
	return func(int) (*exec.Cmd, error) {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "FABRIC_WORKERS_HELPER="+mode)
		cmd.Stderr = os.Stderr
		return cmd, nil
	}
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// runSupervisor runs s until the test ends and returns Run's result channel.
func runSupervisor(t *testing.T, s *Supervisor) (chan error, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("supervisor still running 30s after cancel")
		}
	})
	return done, cancel
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRestartBackoffAndGiveUp: a worker that always crashes is restarted
// after 100, 200, 400ms..., and after MaxRestarts Run gives up.
func TestRestartBackoffAndGiveUp(t *testing.T) {
	var mu sync.Mutex
	var starts []time.Time
	cmd := helperCommand("crash")
	s, err := New(Options{Workers: 1, MaxRestarts: 4, Logger: testLogger(t),
		Command: func(slot int) (*exec.Cmd, error) {
			mu.Lock()
			starts = append(starts, time.Now())
			mu.Unlock()
			return cmd(slot)
		}})
	if err != nil {
		t.Fatal(err)
	}
	done, _ := runSupervisor(t, s)
	select {
	case err := <-done:
		if !errors.Is(err, ErrGaveUp) {
			t.Fatalf("Run: %v, want ErrGaveUp", err)
		}
		done <- err // for the cleanup
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not give up")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(starts) != 5 {
		t.Fatalf("%d starts, want 1 + 4 restarts", len(starts))
	}
	for i := 1; i < len(starts); i++ {
		gap, want := starts[i].Sub(starts[i-1]), DefaultMinBackoff<<(i-1)
		t.Logf("restart %d after %s (backoff %s)", i, gap, want)
		if gap < want {
			t.Errorf("restart %d after %s, want at least the backoff %s", i, gap, want)
		}
	}
}

// get asks the port which worker answers (a new connection each time).
func get(addr string) (int, error) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(string(b))
}

// TestHungWorkerReplaced: a SIGSTOPped worker answers no ping; it is killed
// after HealthTimeout and a new one serves its slot.
func TestHungWorkerReplaced(t *testing.T) {
	addr, files := slotListeners(t, 2)
	s, err := New(Options{Workers: 2, Files: files, Command: helperCommand("serve"), Logger: testLogger(t),
		HealthInterval: 100 * time.Millisecond, HealthTimeout: 600 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runSupervisor(t, s)
	waitFor(t, 20*time.Second, "both workers ready", func() bool {
		st := s.Stats()
		return st[0].Ready && st[1].Ready
	})
	victim := s.Stats()[0].PID
	if err := syscall.Kill(victim, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	waitFor(t, 20*time.Second, "the hung worker replaced", func() bool {
		st := s.Stats()[0]
		return st.PID != 0 && st.PID != victim && st.Ready
	})
	took := time.Since(stopped)
	t.Logf("replaced %s after SIGSTOP", took)
	if took < 600*time.Millisecond {
		t.Errorf("replaced after %s, before HealthTimeout", took)
	}
	if s.Stats()[0].Restarts != 1 {
		t.Errorf("restarts %d, want 1", s.Stats()[0].Restarts)
	}
	// Both slots serve again.
	seen := map[int]bool{}
	for range 200 {
		pid, err := get(addr)
		if err != nil {
			t.Fatalf("request after the replacement: %v", err)
		}
		seen[pid] = true
	}
	if seen[victim] || len(seen) != 2 {
		t.Errorf("answers from %v (victim %d)", seen, victim)
	}
}

// TestRollNoFailedConnection: while a client opens a new connection per
// request without pause, Roll replaces both workers; no request fails.
func TestRollNoFailedConnection(t *testing.T) {
	addr, files := slotListeners(t, 2)
	s, err := New(Options{Workers: 2, Files: files, Command: helperCommand("serve"), Logger: testLogger(t),
		StopTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	done, cancel := runSupervisor(t, s)
	waitFor(t, 20*time.Second, "both workers ready", func() bool {
		st := s.Stats()
		return st[0].Ready && st[1].Ready
	})
	before := map[int]bool{s.Stats()[0].PID: true, s.Stats()[1].PID: true}
	stop := make(chan struct{})
	var requests, failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				requests.Add(1)
				if _, err := get(addr); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	ctx, rcancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer rcancel()
	if err := s.Roll(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // requests against the new workers only
	close(stop)
	wg.Wait()
	t.Logf("%d requests during the roll, %d failed", requests.Load(), failures.Load())
	if failures.Load() > 0 {
		t.Errorf("%d failed requests, first: %v", failures.Load(), firstErr.Load())
	}
	for _, st := range s.Stats() {
		if before[st.PID] || st.PID == 0 {
			t.Errorf("slot %d still runs pid %d after the roll", st.Slot, st.PID)
		}
		if st.Restarts != 0 {
			t.Errorf("slot %d: a roll counted %d restarts", st.Slot, st.Restarts)
		}
	}
	// Shutdown: workers drain, the port closes.
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	done <- nil
	if _, err := get(addr); err == nil {
		t.Error("the port still answers after the supervisor stopped")
	}
}
