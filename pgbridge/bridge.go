package pgbridge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("pgbridge: closed")

// Bridge republishes Postgres notifications (and outbox rows) on a
// fabric.Node. New configures it, Start runs it, Close stops it; it is a
// prometheus.Collector of its fabric_pg_* metrics.
type Bridge struct {
	node    *fabric.Node
	leases  fabric.LeaseStore
	opts    Options
	log     *slog.Logger
	holder  string
	conn    *pgx.ConnConfig // listening connections' config
	poolCfg *pgxpool.Config // outbox pool's config (nil without Outbox)
	leaseP  string          // lease name prefix
	m       *metrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	started   atomic.Bool
	closeOnce sync.Once
	killed    atomic.Bool // a crash for tests: stop without any cleanup

	mu       sync.Mutex
	channels map[string]*state // notify channels
	outbox   *outbox
}

// New returns a Bridge publishing on node. leases elects one bridger per
// notify channel among the instances (jetstream.NewLeaseStore, or
// memory.Backend.Leases() for a single process); it may be nil only when
// no channel is listened to (outbox only). New does no I/O: Start
// connects, and retries until Postgres answers.
func New(node *fabric.Node, leases fabric.LeaseStore, opts Options) (*Bridge, error) {
	if node == nil {
		return nil, errors.New("pgbridge: a node is required")
	}
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("pgbridge: %w", err)
	}
	if leases == nil && len(opts.Notify) > 0 {
		return nil, errors.New("pgbridge: a lease store is required to listen on channels")
	}
	cfg, err := pgx.ParseConfig(opts.URL)
	if err != nil {
		return nil, fmt.Errorf("pgbridge: URL: %w", err)
	}
	if cfg.ConnectTimeout <= 0 || cfg.ConnectTimeout > 10*time.Second {
		cfg.ConnectTimeout = 5 * time.Second
	}
	b := &Bridge{
		node:     node,
		leases:   leases,
		opts:     opts,
		log:      opts.Logger,
		holder:   node.ID(),
		conn:     cfg,
		leaseP:   opts.LeasePrefix,
		m:        newMetrics(),
		channels: make(map[string]*state, len(opts.Notify)),
	}
	if b.log == nil {
		b.log = node.Logger()
	}
	b.log = b.log.With("component", "pgbridge")
	if opts.Outbox {
		if b.poolCfg, err = pgxpool.ParseConfig(opts.URL); err != nil {
			return nil, fmt.Errorf("pgbridge: URL: %w", err)
		}
		b.poolCfg.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
		b.poolCfg.MaxConns = int32(min(opts.Workers, 1<<20))
		b.poolCfg.MinConns = 0
		rp := b.poolCfg.ConnConfig.RuntimeParams
		rp["application_name"] = b.ApplicationName("outbox")
		// A consumer that hangs mid-batch must not hold its partition's
		// lock for ever: Postgres ends its transaction after this.
		rp["idle_in_transaction_session_timeout"] = strconv.FormatInt((opts.BatchTimeout + 10*time.Second).Milliseconds(), 10)
	}
	if b.leaseP == "" {
		b.leaseP = "pgbridge:" + cfg.Database + ":"
	}
	for _, ch := range opts.Notify {
		b.channels[ch] = newState()
		b.m.leaseHeld.WithLabelValues(ch).Set(0)
		b.m.connected.WithLabelValues(ch).Set(0)
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	return b, nil
}

// Start runs the bridge in the background: a lease loop per notify channel
// and, with Outbox, the consumer. It returns at once; failures to reach
// Postgres are retried (see Ready).
func (b *Bridge) Start() error {
	if b.ctx.Err() != nil {
		return ErrClosed
	}
	if !b.started.CompareAndSwap(false, true) {
		return errors.New("pgbridge: already started")
	}
	for _, ch := range b.opts.Notify {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.runChannel(ch, b.channels[ch])
		}()
	}
	if b.opts.Outbox {
		o := newOutbox(b)
		b.mu.Lock()
		b.outbox = o
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			o.run()
		}()
	}
	return nil
}

// Run starts the bridge and runs it until ctx ends, then closes it.
func (b *Bridge) Run(ctx context.Context) error {
	if err := b.Start(); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-b.ctx.Done():
	}
	return b.Close()
}

// Close stops the bridge: it stops listening, gives its leases up (another
// instance takes each channel over within LeaseTTL/3), finishes or
// abandons the outbox batch in flight (its rows stay for the next
// consumer) and closes its connections. It waits for every goroutine and
// is idempotent.
func (b *Bridge) Close() error {
	b.closeOnce.Do(func() {
		b.cancel()
		b.wg.Wait()
	})
	return nil
}

// Ready reports whether the bridge does its job: every notify channel is
// either listened to here or held by another instance, and the outbox
// consumer reaches its table. The error says what is wrong.
func (b *Bridge) Ready() error {
	if !b.started.Load() {
		return errors.New("pgbridge: not started")
	}
	if b.ctx.Err() != nil {
		return ErrClosed
	}
	var problems []string
	for _, ch := range b.opts.Notify {
		if err := b.channels[ch].ready(); err != nil {
			problems = append(problems, fmt.Sprintf("channel %q: %v", ch, err))
		}
	}
	b.mu.Lock()
	o := b.outbox
	b.mu.Unlock()
	if o != nil {
		if err := o.ready(); err != nil {
			problems = append(problems, fmt.Sprintf("outbox %s: %v", b.opts.OutboxTable, err))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	sort.Strings(problems)
	return errors.New("pgbridge: " + strings.Join(problems, "; "))
}

// Describe implements prometheus.Collector.
func (b *Bridge) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range b.m.all {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (b *Bridge) Collect(ch chan<- prometheus.Metric) {
	for _, c := range b.m.all {
		c.Collect(ch)
	}
}

// Holder returns the name this bridge holds leases under (the node's ID).
func (b *Bridge) Holder() string { return b.holder }

// ApplicationName returns the application_name of this bridge's
// connections for role ("notify" or "outbox"), as pg_stat_activity shows it.
func (b *Bridge) ApplicationName(role string) string { return "fabric:" + b.holder + ":" + role }

// connect opens a dedicated connection for role.
func (b *Bridge) connect(ctx context.Context, role string) (*pgx.Conn, error) {
	cfg := b.conn.Copy()
	cfg.RuntimeParams["application_name"] = b.ApplicationName(role)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgbridge: connect: %w", err)
	}
	return conn, nil
}

// closeConn ends conn: politely, or as a crash would when the bridge was
// killed (the socket cut, nothing said to the server).
func (b *Bridge) closeConn(conn *pgx.Conn) {
	if b.killed.Load() {
		cut(conn.PgConn())
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// cut closes a connection's socket without a word to the server.
func cut(c *pgconn.PgConn) {
	if nc := c.Conn(); nc != nil {
		_ = nc.Close()
	}
}

// kill stops the bridge as a crash would (tests): leases are not released,
// transactions are not committed, sockets are cut.
func (b *Bridge) kill() {
	b.killed.Store(true)
	_ = b.Close()
}

// state is one part's health, for Ready.
type state struct {
	mu  sync.Mutex
	err error // nil: fine
}

var errStarting = errors.New("starting")

func newState() *state { return &state{err: errStarting} }

func (s *state) set(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

func (s *state) ready() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// backoff is the reconnect delay: minBackoff doubling to maxBackoff, each
// wait drawn from the upper half of the current step.
type backoff struct{ cur time.Duration }

func (bo *backoff) next() time.Duration {
	if bo.cur == 0 {
		bo.cur = minBackoff
	} else {
		bo.cur = min(2*bo.cur, maxBackoff)
	}
	return jitter(bo.cur)
}

func (bo *backoff) reset() { bo.cur = 0 }

// jitter returns a duration drawn uniformly from [d/2, d].
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// sleep waits d or until ctx ends; it reports whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
