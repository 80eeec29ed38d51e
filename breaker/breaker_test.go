package breaker_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/breaker"
	"github.com/prometheus/client_golang/prometheus"
)

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

var errBackend = errors.New("backend stalled")

// TestStates walks closed → open → half-open → open → half-open → closed,
// with the metrics following.
func TestStates(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	reg := prometheus.NewRegistry()
	var changes []string
	b, err := breaker.New(breaker.Options{Name: "history", FailureThreshold: 3, ResetTimeout: 10 * time.Second, Now: clk.now, Registerer: reg,
		OnStateChange: func(from, to breaker.State) { changes = append(changes, from.String()+">"+to.String()) }})
	if err != nil {
		t.Fatal(err)
	}
	fail := func() error { return errBackend }
	ok := func() error { return nil }
	// Failures that are not consecutive do not open it.
	for range 2 {
		_ = b.Do(fail)
	}
	_ = b.Do(ok)
	for range 2 {
		_ = b.Do(fail)
	}
	if s := b.State(); s != breaker.Closed {
		t.Fatalf("after 2+2 failures split by a success: %s", s)
	}
	if err := b.Do(fail); !errors.Is(err, errBackend) {
		t.Fatalf("third consecutive failure: %v", err)
	}
	if s := b.State(); s != breaker.Open || b.Trips() != 1 {
		t.Fatalf("after 3 consecutive failures: %s, %d trips", s, b.Trips())
	}
	called := false
	if err := b.Do(func() error { called = true; return nil }); !errors.Is(err, breaker.ErrOpen) || called {
		t.Fatalf("open circuit: %v, called %v", err, called)
	}
	if !strings.Contains(fmt.Sprint(b.Do(ok)), `"history"`) {
		t.Fatal("the refusal does not name the breaker")
	}
	clk.add(10 * time.Second)
	if s := b.State(); s != breaker.HalfOpen {
		t.Fatalf("after the reset timeout: %s", s)
	}
	// One probe at a time: a second call while the probe runs is refused.
	done, err := b.Allow()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Allow(); !errors.Is(err, breaker.ErrOpen) {
		t.Fatalf("second call during the probe: %v", err)
	}
	done(errBackend) // the probe fails: open again, for a new timeout
	if s := b.State(); s != breaker.Open || b.Trips() != 2 {
		t.Fatalf("after a failed probe: %s, %d trips", s, b.Trips())
	}
	clk.add(9 * time.Second)
	if err := b.Do(ok); !errors.Is(err, breaker.ErrOpen) {
		t.Fatalf("before the new timeout: %v", err)
	}
	clk.add(time.Second)
	if err := b.Do(ok); err != nil {
		t.Fatalf("successful probe: %v", err)
	}
	if s := b.State(); s != breaker.Closed {
		t.Fatalf("after a successful probe: %s", s)
	}
	want := []string{"closed>open", "open>half_open", "half_open>open", "open>half_open", "half_open>closed"}
	if fmt.Sprint(changes) != fmt.Sprint(want) {
		t.Fatalf("transitions %v, want %v", changes, want)
	}
	for name, want := range map[string]float64{"fabric_breaker_rejected_total": 4, "fabric_breaker_state": 0, "fabric_breaker_trips_total": 2} {
		if got := metric(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// metric returns the value of the one sample of name in reg.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestCanceledIsNotAFailure: the caller giving up is not the backend failing.
func TestCanceledIsNotAFailure(t *testing.T) {
	b, _ := breaker.New(breaker.Options{FailureThreshold: 1})
	_ = b.Do(func() error { return fmt.Errorf("append: %w", context.Canceled) })
	if s := b.State(); s != breaker.Closed {
		t.Fatalf("a cancelled call opened the circuit: %s", s)
	}
	_ = b.Do(func() error { return context.DeadlineExceeded })
	if s := b.State(); s != breaker.Open {
		t.Fatalf("a stalled call (deadline) did not: %s", s)
	}
}

// TestSuccessFailure: the seed's success()/failure() reporting, without Allow.
func TestSuccessFailure(t *testing.T) {
	clk := &clock{t: time.Unix(0, 0)}
	b, _ := breaker.New(breaker.Options{FailureThreshold: 2, ResetTimeout: time.Second, Now: clk.now})
	b.Failure()
	b.Failure()
	if b.State() != breaker.Open {
		t.Fatal("not open")
	}
	clk.add(time.Second)
	b.Success()
	if s := b.State(); s != breaker.Closed {
		t.Fatalf("a success after the timeout: %s", s)
	}
	b.Failure()
	b.Failure()
	b.Reset()
	if s := b.State(); s != breaker.Closed {
		t.Fatalf("after Reset: %s", s)
	}
}

// TestConcurrent hammers a breaker from many goroutines (run with -race):
// while open, nothing reaches the backend.
func TestConcurrent(t *testing.T) {
	clk := &clock{t: time.Unix(0, 0)}
	b, _ := breaker.New(breaker.Options{FailureThreshold: 5, ResetTimeout: time.Hour, Now: clk.now})
	var calls atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				_ = b.Do(func() error { calls.Add(1); return errBackend })
			}
		})
	}
	wg.Wait()
	// Five consecutive failures open it; calls allowed before it opened may
	// finish after (at most one per goroutine).
	if n := calls.Load(); n < 5 || n > 5+8 {
		t.Fatalf("%d calls reached the backend", n)
	}
	if b.State() != breaker.Open || b.Trips() != 1 {
		t.Fatalf("state %s, %d trips", b.State(), b.Trips())
	}
}

func TestDuplicateNameOnOneRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := breaker.New(breaker.Options{Name: "a", Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	if _, err := breaker.New(breaker.Options{Name: "b", Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	if _, err := breaker.New(breaker.Options{Name: "a", Registerer: reg}); err == nil {
		t.Fatal("a second breaker named a registered")
	}
}
