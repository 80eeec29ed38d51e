// Package breaker is a circuit breaker for backend calls that can stall
// (a broadcast on the broker, a history append, a presence write): after
// FailureThreshold consecutive failures the circuit opens and calls fail at
// once with ErrOpen instead of waiting on a backend that is not answering;
// after ResetTimeout one probe call is let through (half-open), and its
// outcome closes the circuit again or reopens it.
//
//	b, _ := breaker.New(breaker.Options{Name: "history"})
//	err := b.Do(func() error { _, err := h.Append(ctx, topic, env); return err })
//
// A Breaker owns no goroutine and no timer: the open → half-open step is
// taken by the first call after ResetTimeout. Its state and trips are
// Prometheus metrics (fabric_breaker_state, fabric_breaker_trips_total,
// fabric_breaker_rejected_total, labelled breaker=Name).
package breaker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ErrOpen is returned, wrapped with the breaker's name, for calls refused
// while the circuit is open (or half-open with its probe in flight).
var ErrOpen = errors.New("circuit breaker open: backend unavailable")

// State is a circuit's state.
type State int32

// States of a circuit.
const (
	// Closed lets every call through and counts consecutive failures.
	Closed State = iota
	// Open refuses every call until ResetTimeout has passed.
	Open
	// HalfOpen lets one probe call through; its outcome decides.
	HalfOpen
)

// String returns "closed", "open" or "half_open".
func (s State) String() string {
	switch s {
	case Closed:
		return "closed"
	case Open:
		return "open"
	case HalfOpen:
		return "half_open"
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// Defaults of Options.
const (
	DefaultFailureThreshold = 5
	DefaultResetTimeout     = 30 * time.Second
)

// Options configures a Breaker. The zero value has the defaults.
type Options struct {
	// Name labels the breaker's metrics and errors (default "default").
	Name string
	// FailureThreshold is how many consecutive failures open the circuit
	// (default 5).
	FailureThreshold int
	// ResetTimeout is how long the circuit stays open before a probe is let
	// through (default 30s).
	ResetTimeout time.Duration
	// IsFailure reports whether a call's error counts as a backend failure
	// (default: any error but context.Canceled, which is the caller's doing;
	// a deadline that passed is a stall and counts).
	IsFailure func(error) bool
	// OnStateChange runs after each transition, outside the breaker's lock.
	OnStateChange func(from, to State)
	// Registerer receives the breaker's metrics; nil leaves them
	// unregistered. Breakers sharing a registry need distinct names.
	Registerer prometheus.Registerer
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Breaker is one circuit. It is safe for concurrent use.
type Breaker struct {
	opts Options

	mu       sync.Mutex
	state    State
	failures int       // consecutive failures while closed
	openedAt time.Time // when the circuit last opened
	probing  bool      // a half-open probe is in flight
	trips    uint64
	rejected uint64

	stateDesc, tripsDesc, rejectedDesc *prometheus.Desc
}

// New returns a closed Breaker.
func New(opts Options) (*Breaker, error) {
	if opts.FailureThreshold < 0 || opts.ResetTimeout < 0 {
		return nil, errors.New("breaker: FailureThreshold and ResetTimeout must not be negative")
	}
	if opts.Name == "" {
		opts.Name = "default"
	}
	if opts.FailureThreshold == 0 {
		opts.FailureThreshold = DefaultFailureThreshold
	}
	if opts.ResetTimeout == 0 {
		opts.ResetTimeout = DefaultResetTimeout
	}
	if opts.IsFailure == nil {
		opts.IsFailure = func(err error) bool { return err != nil && !errors.Is(err, context.Canceled) }
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	labels := prometheus.Labels{"breaker": opts.Name}
	b := &Breaker{
		opts: opts,
		stateDesc: prometheus.NewDesc("fabric_breaker_state",
			"Circuit breaker state: 0 closed, 1 open, 2 half-open.", nil, labels),
		tripsDesc: prometheus.NewDesc("fabric_breaker_trips_total",
			"Times the circuit breaker opened.", nil, labels),
		rejectedDesc: prometheus.NewDesc("fabric_breaker_rejected_total",
			"Calls the circuit breaker refused at once because the circuit was open.", nil, labels),
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(b); err != nil {
			return nil, fmt.Errorf("breaker %q: registering metrics: %w", opts.Name, err)
		}
	}
	return b, nil
}

// Name returns the breaker's name.
func (b *Breaker) Name() string { return b.opts.Name }

// State returns the circuit's state now (an open circuit whose
// ResetTimeout has passed reports HalfOpen).
func (b *Breaker) State() State {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state == Open && !b.opts.Now().Before(b.openedAt.Add(b.opts.ResetTimeout)) {
		return HalfOpen
	}
	return b.state
}

// Trips returns how many times the circuit has opened.
func (b *Breaker) Trips() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.trips
}

// Allow asks to make one call. Refused, it returns an error wrapping
// ErrOpen. Allowed, the caller must report the call's outcome with done
// (exactly once; nil for success).
func (b *Breaker) Allow() (done func(err error), err error) {
	b.mu.Lock()
	var change *[2]State
	switch b.state {
	case Open:
		if b.opts.Now().Before(b.openedAt.Add(b.opts.ResetTimeout)) {
			b.rejected++
			b.mu.Unlock()
			return nil, fmt.Errorf("breaker %q: %w", b.opts.Name, ErrOpen)
		}
		change = &[2]State{Open, HalfOpen}
		b.state = HalfOpen
		fallthrough
	case HalfOpen:
		if b.probing {
			b.rejected++
			b.mu.Unlock()
			b.notify(change)
			return nil, fmt.Errorf("breaker %q: %w", b.opts.Name, ErrOpen)
		}
		b.probing = true
		b.mu.Unlock()
		b.notify(change)
		return b.doneFunc(true), nil
	}
	b.mu.Unlock()
	return b.doneFunc(false), nil
}

// doneFunc records the outcome of one allowed call.
func (b *Breaker) doneFunc(probe bool) func(error) {
	var once sync.Once
	return func(err error) {
		once.Do(func() { b.record(probe, b.opts.IsFailure(err)) })
	}
}

func (b *Breaker) record(probe, failed bool) {
	b.mu.Lock()
	var change *[2]State
	if probe {
		b.probing = false
	}
	switch {
	case !failed:
		b.failures = 0
		if b.state == HalfOpen && probe {
			change = &[2]State{HalfOpen, Closed}
			b.state = Closed
		}
	case b.state == HalfOpen && probe:
		change = b.open(HalfOpen)
	case b.state == Closed:
		b.failures++
		if b.failures >= b.opts.FailureThreshold {
			change = b.open(Closed)
		}
	}
	b.mu.Unlock()
	b.notify(change)
}

// open opens the circuit; b.mu is held.
func (b *Breaker) open(from State) *[2]State {
	b.state = Open
	b.openedAt = b.opts.Now()
	b.failures = 0
	b.trips++
	return &[2]State{from, Open}
}

func (b *Breaker) notify(change *[2]State) {
	if change != nil && b.opts.OnStateChange != nil {
		b.opts.OnStateChange(change[0], change[1])
	}
}

// Do runs fn through the breaker: refused at once with ErrOpen while the
// circuit is open, otherwise run, its error recorded and returned.
func (b *Breaker) Do(fn func() error) error {
	done, err := b.Allow()
	if err != nil {
		return err
	}
	err = fn()
	done(err)
	return err
}

// Success records a successful call made without Allow (the seed's
// success()); it closes a half-open circuit.
func (b *Breaker) Success() { b.record(b.halfOpen(), false) }

// Failure records a failed call made without Allow (the seed's failure()).
func (b *Breaker) Failure() { b.record(b.halfOpen(), true) }

// halfOpen reports whether the circuit is half-open, taking the open →
// half-open step when its time has come.
func (b *Breaker) halfOpen() bool {
	b.mu.Lock()
	var change *[2]State
	if b.state == Open && !b.opts.Now().Before(b.openedAt.Add(b.opts.ResetTimeout)) {
		b.state = HalfOpen
		change = &[2]State{Open, HalfOpen}
	}
	h := b.state == HalfOpen
	b.mu.Unlock()
	b.notify(change)
	return h
}

// Reset closes the circuit and forgets its failures.
func (b *Breaker) Reset() {
	b.mu.Lock()
	var change *[2]State
	if b.state != Closed {
		change = &[2]State{b.state, Closed}
	}
	b.state, b.failures, b.probing = Closed, 0, false
	b.mu.Unlock()
	b.notify(change)
}

// Describe implements prometheus.Collector.
func (b *Breaker) Describe(ch chan<- *prometheus.Desc) {
	ch <- b.stateDesc
	ch <- b.tripsDesc
	ch <- b.rejectedDesc
}

// Collect implements prometheus.Collector.
func (b *Breaker) Collect(ch chan<- prometheus.Metric) {
	s := b.State()
	b.mu.Lock()
	trips, rejected := b.trips, b.rejected
	b.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(b.stateDesc, prometheus.GaugeValue, float64(s))
	ch <- prometheus.MustNewConstMetric(b.tripsDesc, prometheus.CounterValue, float64(trips))
	ch <- prometheus.MustNewConstMetric(b.rejectedDesc, prometheus.CounterValue, float64(rejected))
}
