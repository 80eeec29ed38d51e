package workers

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of Options (the seed's figures).
const (
	DefaultHealthInterval = 10 * time.Second
	DefaultHealthTimeout  = 30 * time.Second
	DefaultReadyPoll      = 250 * time.Millisecond
	DefaultMinBackoff     = 100 * time.Millisecond
	DefaultMaxBackoff     = 5 * time.Second
	DefaultMaxRestarts    = 50
	DefaultStableAfter    = time.Minute
	DefaultStopTimeout    = 35 * time.Second
	DefaultReadyTimeout   = 2 * time.Minute
)

// Options configures a Supervisor. Workers and Command are required.
type Options struct {
	// Workers is how many worker processes run (one per slot).
	Workers int
	// Command returns the command of a new worker for slot (a fresh
	// exec.Cmd each time; the binary is looked up again, so that a rolling
	// restart after replacing it on disk is an upgrade). The supervisor sets
	// ExtraFiles (the control socket, then Files[slot]) and puts the worker
	// in its own process group; Stdout and Stderr are the caller's.
	Command func(slot int) (*exec.Cmd, error)
	// Files are the listening sockets of each slot (Files[slot]), inherited
	// by its workers from FirstListenerFD on. The Supervisor owns them from
	// Run on and closes them when it stops.
	Files [][]*os.File
	// Init returns the application's part of a new worker's init message
	// (Init.Data); nil sends none.
	Init func(slot int) json.RawMessage
	// PrimaryState, when set, is sent with every ping (Worker.Primary).
	PrimaryState func() json.RawMessage

	// HealthInterval is how often a ready worker is pinged (default 10s).
	HealthInterval time.Duration
	// HealthTimeout terminates a worker that leaves a ping unanswered this
	// long (default 30s); a new worker must answer its first within it too.
	HealthTimeout time.Duration
	// ReadyPoll is how often a worker that is not ready yet is pinged
	// (default 250ms), so that a roll moves on as soon as it is.
	ReadyPoll time.Duration
	// MinBackoff and MaxBackoff bound the delay before a restart (100ms,
	// doubling up to 5s).
	MinBackoff, MaxBackoff time.Duration
	// MaxRestarts is how many times one slot's worker is restarted without
	// a stable run before Run gives up (default 50).
	MaxRestarts int
	// StableAfter is how long a worker must have been ready for its exit to
	// restart its slot's backoff and count from scratch (default 1m).
	StableAfter time.Duration
	// StopTimeout is how long a worker told to stop (SIGTERM) may drain
	// before it is killed (default 35s: fabric serve's 30s shutdown timeout
	// and a margin).
	StopTimeout time.Duration
	// ReadyTimeout bounds how long a roll waits for a new worker to be ready
	// (default 2m); one that is not is killed and the old one kept.
	ReadyTimeout time.Duration
	// Logger receives the supervisor's logs.
	Logger *slog.Logger
}

func (o *Options) defaults() {
	set := func(p *time.Duration, d time.Duration) {
		if *p <= 0 {
			*p = d
		}
	}
	set(&o.HealthInterval, DefaultHealthInterval)
	set(&o.HealthTimeout, DefaultHealthTimeout)
	set(&o.ReadyPoll, DefaultReadyPoll)
	set(&o.MinBackoff, DefaultMinBackoff)
	set(&o.MaxBackoff, DefaultMaxBackoff)
	set(&o.StableAfter, DefaultStableAfter)
	set(&o.StopTimeout, DefaultStopTimeout)
	set(&o.ReadyTimeout, DefaultReadyTimeout)
	if o.MaxRestarts <= 0 {
		o.MaxRestarts = DefaultMaxRestarts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// ErrGaveUp is wrapped by Run's error when a slot's worker kept failing.
var ErrGaveUp = errors.New("workers: a worker kept failing")

// Supervisor runs and watches the workers; see the package documentation.
type Supervisor struct {
	opts  Options
	log   *slog.Logger
	slots []*slot

	mu       sync.Mutex
	running  bool
	stopping bool // no more workers start; Files are closed
	runDone  chan struct{}
}

// slot is one worker position: its sockets and the worker serving it.
type slot struct {
	index int
	rolls chan chan error

	mu       sync.Mutex
	stats    SlotStats
	restarts int
}

// SlotStats describes a slot (Stats).
type SlotStats struct {
	// Slot is the slot's index.
	Slot int
	// PID is its current worker's process id (0 while it restarts).
	PID int
	// Ready reports its last health answer.
	Ready bool
	// Status is what it last said it waits for.
	Status string
	// Connections is how many client connections it last reported.
	Connections int
	// Restarts counts the slot's restarts since the supervisor started
	// (those after a failure; not rolls).
	Restarts int
	// Started is when its current worker started.
	Started time.Time
}

// New returns a Supervisor; Run starts it.
func New(opts Options) (*Supervisor, error) {
	if opts.Workers <= 0 {
		return nil, fmt.Errorf("workers: %d workers: want at least 1", opts.Workers)
	}
	if opts.Command == nil {
		return nil, errors.New("workers: Options.Command is required")
	}
	if opts.Files != nil && len(opts.Files) != opts.Workers {
		return nil, fmt.Errorf("workers: %d slots of files for %d workers", len(opts.Files), opts.Workers)
	}
	opts.defaults()
	s := &Supervisor{opts: opts, log: opts.Logger, runDone: make(chan struct{})}
	for i := range opts.Workers {
		s.slots = append(s.slots, &slot{index: i, rolls: make(chan chan error), stats: SlotStats{Slot: i}})
	}
	return s, nil
}

// Run starts every worker and keeps them running until ctx ends, then
// stops them (SIGTERM, StopTimeout, SIGKILL) and returns nil. It returns an
// error wrapping ErrGaveUp, after stopping the others, when one slot's
// worker failed MaxRestarts times in a row. A Supervisor runs once.
func (s *Supervisor) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errors.New("workers: the supervisor runs once")
	}
	s.running = true
	s.mu.Unlock()
	defer close(s.runDone)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(s.slots))
	var wg sync.WaitGroup
	for _, sl := range s.slots {
		wg.Go(func() {
			if err := s.runSlot(ctx, sl); err != nil {
				errc <- err
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		s.log.Error("giving up: stopping every worker", "err", err)
	}
	s.beginStop()
	cancel()
	wg.Wait()
	return err
}

// beginStop stops new workers and closes the supervisor's copies of the
// sockets: the port stops accepting as the workers close theirs.
func (s *Supervisor) beginStop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return
	}
	s.stopping = true
	for _, fs := range s.opts.Files {
		for _, f := range fs {
			_ = f.Close()
		}
	}
}

// Roll replaces every worker, one slot at a time: a new worker on the
// slot's sockets, ready, then the old one drained. It stops at the first
// slot whose new worker does not become ready (that slot keeps its old
// worker) and returns the error.
func (s *Supervisor) Roll(ctx context.Context) error {
	for _, sl := range s.slots {
		reply := make(chan error, 1)
		select {
		case sl.rolls <- reply:
		case <-s.runDone:
			return errors.New("workers: not running")
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case err := <-reply:
			if err != nil {
				return fmt.Errorf("workers: roll slot %d: %w", sl.index, err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Stats returns every slot's state.
func (s *Supervisor) Stats() []SlotStats {
	out := make([]SlotStats, len(s.slots))
	for i, sl := range s.slots {
		sl.mu.Lock()
		out[i] = sl.stats
		out[i].Restarts = sl.restarts
		sl.mu.Unlock()
	}
	return out
}

// proc is one worker process.
type proc struct {
	slot    int
	cmd     *exec.Cmd
	conn    net.Conn
	started time.Time
	exited  chan struct{} // closed once the process has been waited for
	exitErr error
	pongs   chan message
	quit    chan struct{} // ends the reader

	// Owned by the goroutine watching the worker.
	nextID  uint64
	pending map[uint64]time.Time
	ready   bool
	readyAt time.Time
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// event is why watching a worker stopped.
type event int

const (
	evStop      event = iota // the supervisor stops
	evRoll                   // a roll asks to replace the worker
	evExit                   // the worker exited
	evUnhealthy              // a ping went unanswered for HealthTimeout
	evReady                  // (untilReady) the worker is ready
)

// runSlot keeps a worker on the slot until ctx ends.
func (s *Supervisor) runSlot(ctx context.Context, sl *slot) error {
	backoff := s.opts.MinBackoff
	failures := 0
	var w *proc
	for {
		if w == nil {
			if ctx.Err() != nil {
				return nil
			}
			nw, err := s.spawn(sl, s.othersReady(sl))
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				s.log.Error("worker did not start", "slot", sl.index, "err", err)
			} else {
				s.setStats(sl, nw)
			}
			w = nw
		}
		var ev event
		var roll chan error
		if w != nil {
			ev, roll = s.watch(ctx, sl, w, false)
		} else {
			ev = evExit
		}
		switch ev {
		case evStop:
			s.stop(w)
			return nil
		case evRoll:
			nw, err := s.replace(ctx, sl, w)
			roll <- err
			w = nw
			continue
		case evUnhealthy:
			s.log.Error("worker unresponsive: terminating it", "slot", sl.index, "pid", w.pid(), "timeout", s.opts.HealthTimeout)
			s.kill(w)
		case evExit:
			if w != nil {
				s.reap(w)
				s.log.Warn("worker exited", "slot", sl.index, "pid", w.pid(), "err", exitString(w.exitErr))
			}
		}
		// A failure: restart after the backoff, unless the slot failed too
		// often without a stable run.
		if w != nil && w.ready && time.Since(w.readyAt) >= s.opts.StableAfter {
			failures, backoff = 0, s.opts.MinBackoff
		}
		w = nil
		failures++
		sl.mu.Lock()
		sl.restarts++
		sl.stats.PID, sl.stats.Ready = 0, false
		sl.mu.Unlock()
		if failures > s.opts.MaxRestarts {
			return fmt.Errorf("%w: slot %d failed %d times in a row", ErrGaveUp, sl.index, failures)
		}
		s.log.Info("restarting worker", "slot", sl.index, "in", backoff, "restart", failures, "of", s.opts.MaxRestarts)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, s.opts.MaxBackoff)
	}
}

// replace starts a new worker on sl, waits until it is ready, then stops
// old and returns the new one; if the new one fails, it is killed and old
// returned with the error.
func (s *Supervisor) replace(ctx context.Context, sl *slot, old *proc) (*proc, error) {
	nw, err := s.spawn(sl, true)
	if err != nil {
		s.setStats(sl, old)
		return old, err
	}
	rctx, cancel := context.WithTimeout(ctx, s.opts.ReadyTimeout)
	ev, _ := s.watch(rctx, sl, nw, true)
	cancel()
	if ev != evReady {
		s.kill(nw)
		s.setStats(sl, old)
		if ctx.Err() != nil {
			return old, ctx.Err()
		}
		return old, fmt.Errorf("new worker (pid %d) not ready: %s", nw.pid(), evName(ev))
	}
	s.log.Info("roll: new worker ready, draining the old one", "slot", sl.index, "new", nw.pid(), "old", old.pid())
	s.stop(old)
	s.setStats(sl, nw)
	return nw, nil
}

func evName(ev event) string {
	switch ev {
	case evStop:
		return "stopped or timed out"
	case evExit:
		return "it exited"
	case evUnhealthy:
		return "it did not answer"
	}
	return "interrupted"
}

// othersReady reports whether a worker of another slot is ready.
func (s *Supervisor) othersReady(sl *slot) bool {
	for _, o := range s.slots {
		if o == sl {
			continue
		}
		o.mu.Lock()
		ready := o.stats.Ready
		o.mu.Unlock()
		if ready {
			return true
		}
	}
	return false
}

// spawn starts a worker on sl and sends it its init message; gated says
// other workers serve the port (Init.Gated): always so for a replacement.
func (s *Supervisor) spawn(sl *slot, gated bool) (*proc, error) {
	cmd, err := s.opts.Command(sl.index)
	if err != nil {
		return nil, fmt.Errorf("workers: command: %w", err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("workers: socketpair: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "control"), os.NewFile(uintptr(fds[1]), "control-worker")
	defer mine.Close()
	var files []*os.File
	if s.opts.Files != nil {
		files = s.opts.Files[sl.index]
	}
	cmd.ExtraFiles = append([]*os.File{theirs}, files...)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	s.mu.Lock() // the files stay open until the child has its copies
	if s.stopping {
		s.mu.Unlock()
		theirs.Close()
		return nil, errors.New("workers: stopping")
	}
	err = cmd.Start()
	s.mu.Unlock()
	theirs.Close()
	if err != nil {
		return nil, fmt.Errorf("workers: start: %w", err)
	}
	conn, cerr := net.FileConn(mine)
	w := &proc{slot: sl.index, cmd: cmd, conn: conn, started: time.Now(), exited: make(chan struct{}),
		pongs: make(chan message, 16), quit: make(chan struct{}),
		// The start counts as a ping: a worker must answer its first
		// within HealthTimeout.
		pending: map[uint64]time.Time{0: time.Now()}}
	go func() {
		w.exitErr = cmd.Wait()
		close(w.exited)
		if conn != nil {
			_ = conn.Close()
		}
	}()
	if cerr != nil {
		s.kill(w)
		return nil, fmt.Errorf("workers: control socket: %w", cerr)
	}
	go w.read()
	init := Init{Slot: sl.index, Listeners: len(files), Gated: gated}
	if s.opts.Init != nil {
		init.Data = s.opts.Init(sl.index)
	}
	if err := writeMsg(conn, message{Type: "init", Init: &init}, 5*time.Second); err != nil {
		s.kill(w)
		return nil, err
	}
	s.log.Info("worker started", "slot", sl.index, "pid", w.pid(), "gated", gated)
	return w, nil
}

// read passes the worker's pongs to the goroutine watching it.
func (w *proc) read() {
	defer close(w.pongs)
	rd := bufio.NewReaderSize(w.conn, maxLine)
	for {
		m, err := readMsg(rd)
		if err != nil {
			return
		}
		if m.Type != "pong" {
			continue
		}
		select {
		case w.pongs <- m:
		case <-w.quit:
			return
		}
	}
}

// watch health-checks w until something happens to it or to the
// supervisor; with untilReady it also returns as soon as w is ready (and
// ignores rolls).
func (s *Supervisor) watch(ctx context.Context, sl *slot, w *proc, untilReady bool) (event, chan error) {
	o := &s.opts
	nextPing := time.Now()
	rolls := sl.rolls
	if untilReady {
		rolls = nil
	}
	pongs := w.pongs
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		if untilReady && w.ready {
			return evReady, nil
		}
		now := time.Now()
		oldest := time.Time{}
		for _, at := range w.pending {
			if oldest.IsZero() || at.Before(oldest) {
				oldest = at
			}
		}
		if !oldest.IsZero() && now.Sub(oldest) >= o.HealthTimeout {
			return evUnhealthy, nil
		}
		if !now.Before(nextPing) {
			w.nextID++
			m := message{Type: "ping", ID: w.nextID}
			if o.PrimaryState != nil {
				m.Primary = o.PrimaryState()
			}
			// A worker that cannot take a ping answers none: the
			// deadline below catches it.
			if err := writeMsg(w.conn, m, time.Second); err == nil {
				w.pending[w.nextID] = now
			}
			interval := o.HealthInterval
			if !w.ready {
				interval = min(interval, o.ReadyPoll)
			}
			nextPing = now.Add(interval)
		}
		wake := nextPing
		if !oldest.IsZero() && oldest.Add(o.HealthTimeout).Before(wake) {
			wake = oldest.Add(o.HealthTimeout)
		}
		t.Reset(max(time.Until(wake), time.Millisecond))
		select {
		case <-ctx.Done():
			return evStop, nil
		case reply := <-rolls:
			return evRoll, reply
		case <-w.exited:
			return evExit, nil
		case m, ok := <-pongs:
			if !ok {
				pongs = nil // the socket ended: the exit follows, or the deadline
				continue
			}
			for id := range w.pending {
				if id <= m.ID {
					delete(w.pending, id)
				}
			}
			if h := m.Health; h != nil {
				if h.Ready && !w.ready {
					w.readyAt = time.Now()
					s.log.Info("worker ready", "slot", sl.index, "pid", w.pid(), "after", time.Since(w.started).Round(time.Millisecond))
				}
				w.ready = h.Ready
				if !untilReady {
					s.setStats(sl, w)
				}
				sl.mu.Lock()
				if sl.stats.PID == w.pid() {
					sl.stats.Ready, sl.stats.Status, sl.stats.Connections = h.Ready, h.Status, h.Connections
				}
				sl.mu.Unlock()
			}
		case <-t.C:
		}
	}
}

// setStats makes w the slot's current worker in Stats.
func (s *Supervisor) setStats(sl *slot, w *proc) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.stats.PID != w.pid() {
		sl.stats = SlotStats{Slot: sl.index, PID: w.pid(), Started: w.started, Ready: w.ready}
	}
}

// stop asks w to drain (SIGTERM; SIGCONT in case it is stopped) and kills
// it if it has not exited within StopTimeout.
func (s *Supervisor) stop(w *proc) {
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	_ = w.cmd.Process.Signal(syscall.SIGCONT)
	t := time.NewTimer(s.opts.StopTimeout)
	defer t.Stop()
	select {
	case <-w.exited:
	case <-t.C:
		s.log.Warn("worker did not drain in time: killing it", "slot", w.slot, "pid", w.pid(), "timeout", s.opts.StopTimeout)
		_ = w.cmd.Process.Kill()
		<-w.exited
	}
	s.reap(w)
	s.log.Info("worker stopped", "slot", w.slot, "pid", w.pid(), "status", exitString(w.exitErr))
}

// kill ends w at once.
func (s *Supervisor) kill(w *proc) {
	_ = w.cmd.Process.Kill()
	<-w.exited
	s.reap(w)
}

// reap releases what watched w once it has exited.
func (s *Supervisor) reap(w *proc) {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
}

func exitString(err error) string {
	if err == nil {
		return "exit 0"
	}
	return err.Error()
}
