// Package memory is a Fabric backend that lives in one process: pub/sub,
// history, presence entries, rate limits, cluster counts and leases, all in
// memory, with no NATS. It is the quickest way to run unit tests and to
// embed Fabric in a Go program that needs no cluster.
//
// Several Nodes of one process may share a *Backend: they then behave
// exactly like the instances of one cluster (a publish on one reaches the
// subscribers of all, they share histories, presence, limits and leases).
//
// Everything is synchronous: a publish is delivered to every subscribed
// Receiver before Publish returns, a presence write reaches every watcher
// before Put returns. Nothing is ever dropped, and nothing survives the
// process. Two rules follow from that: a fabric.Receiver must not publish
// to (or append to the history of) its own topic from inside Receive, and
// a fabric.PresenceWatcher must not write to the presence store (nor stop
// its own watch) from inside its methods; either deadlocks. Nodes and
// fabric.Presence never do.
package memory

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"hash/maphash"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults of Options.
const (
	// DefaultMaxPerTopic is how many messages each topic's history keeps
	// (the seed's maxPerTopic).
	DefaultMaxPerTopic = 200
	// DefaultMaxTopics is how many topic histories are kept at most.
	DefaultMaxTopics = 100_000
	// DefaultMaxPresence is how many presence entries the store holds at
	// most.
	DefaultMaxPresence = 1_000_000
	// DefaultSweepInterval is how often expired history messages, idle
	// rate-limit keys, ended bans and expired leases are cleared.
	DefaultSweepInterval = time.Second
)

// ErrClosed is returned by every operation on a closed Backend or Broker.
var ErrClosed = errors.New("memory: backend closed")

// Options configures New. The zero value has the defaults.
type Options struct {
	// MaxPerTopic is how many messages each topic's history keeps (default
	// 200); older ones are dropped as new ones arrive.
	MaxPerTopic int
	// MaxAge drops history messages older than this (default 0: none).
	MaxAge time.Duration
	// MaxTopics bounds the topics whose history is kept (default 100,000):
	// past it, the history of the topic least recently appended to is
	// dropped, and a later Append to that topic starts a new epoch.
	MaxTopics int
	// MaxPresence bounds the presence entries stored (default 1,000,000);
	// a Put of a new entry past it fails.
	MaxPresence int
	// SweepInterval is how often a background sweep clears expired history
	// messages, idle rate-limit keys, ended bans and expired leases
	// (default 1s). Reads never see expired data either way.
	SweepInterval time.Duration
	// Logger receives warnings (failed presence writes); nil discards them.
	Logger *slog.Logger
}

// Backend is one in-memory backend; see the package documentation. Create
// it with New and stop it with Close.
type Backend struct {
	opts  Options
	log   *slog.Logger
	seed  maphash.Seed
	start time.Time

	shards [shardCount]shard

	// base names the current generation of every history; WipeHistory
	// replaces it.
	base      atomic.Pointer[epochBase]
	tick      atomic.Uint64 // orders appends, for the least-recently-appended eviction
	evictMu   sync.Mutex
	histCount atomic.Int64
	evictions atomic.Uint64
	subCount  atomic.Int64

	history  *History
	presence *PresenceStore
	leases   *Leases

	limMu    sync.Mutex
	limiters map[string]*rlState

	clusterMu sync.Mutex
	nodes     map[*fabric.Node]int // registered nodes (see Cluster), with a count of registrations

	descHistTopics, descEvictions, descSubs *prometheus.Desc

	closed    atomic.Bool
	done      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// epochBase is one generation of the whole history store.
type epochBase struct{ id string }

func newEpochBase() *epochBase {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return &epochBase{id: hex.EncodeToString(b[:])}
}

// epoch names the incarnation of a topic history created under base with
// the topic's eviction generation gen.
func (e *epochBase) epoch(gen uint32) string {
	return e.id + "." + strconv.FormatUint(uint64(gen), 36)
}

// New returns a running Backend. Close stops its goroutines.
func New(opts Options) *Backend {
	if opts.MaxPerTopic <= 0 {
		opts.MaxPerTopic = DefaultMaxPerTopic
	}
	if opts.MaxAge < 0 {
		opts.MaxAge = 0
	}
	if opts.MaxTopics <= 0 {
		opts.MaxTopics = DefaultMaxTopics
	}
	if opts.MaxPresence <= 0 {
		opts.MaxPresence = DefaultMaxPresence
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = DefaultSweepInterval
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	b := &Backend{
		opts:     opts,
		log:      opts.Logger,
		seed:     maphash.MakeSeed(),
		start:    time.Now(),
		limiters: map[string]*rlState{},
		nodes:    map[*fabric.Node]int{},
		done:     make(chan struct{}),
		descHistTopics: prometheus.NewDesc("fabric_memory_history_topics",
			"Topics whose history the memory backend keeps.", nil, nil),
		descEvictions: prometheus.NewDesc("fabric_memory_history_evictions_total",
			"Topic histories the memory backend dropped because MaxTopics was reached.", nil, nil),
		descSubs: prometheus.NewDesc("fabric_memory_subscriptions",
			"Broker subscriptions on the memory backend (one per topic per node).", nil, nil),
	}
	for i := range b.shards {
		b.shards[i].topics = map[string]*topicState{}
	}
	b.base.Store(newEpochBase())
	b.history = &History{b: b}
	b.presence = newPresenceStore(b)
	b.leases = &Leases{b: b, m: map[string]lease{}}
	b.wg.Add(2)
	go b.presence.run()
	go b.sweep()
	return b
}

// Close stops every goroutine of the backend; later operations fail with
// ErrClosed. It is idempotent.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		b.closed.Store(true)
		close(b.done)
		b.wg.Wait()
	})
	return nil
}

// Options returns the options in effect, defaults filled in.
func (b *Backend) Options() Options { return b.opts }

// now is the backend's monotonic clock, in nanoseconds since New.
func (b *Backend) now() int64 { return int64(time.Since(b.start)) }

// sweep periodically clears what has expired: history messages past
// MaxAge, idle rate-limit keys and ended bans, expired leases.
func (b *Backend) sweep() {
	defer b.wg.Done()
	t := time.NewTicker(b.opts.SweepInterval)
	defer t.Stop()
	var buf []*topicState
	for {
		select {
		case <-b.done:
			return
		case <-t.C:
		}
		if b.opts.MaxAge > 0 {
			buf = b.expireHistories(buf)
		}
		b.sweepLimiters()
		b.leases.sweep(b.now())
	}
}

// clip shortens s for error messages.
func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}
