package jetstream

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultTopicBuffer is the default BrokerOptions.TopicBuffer: the headroom
// one topic had when every topic of a shard shared its channel, so a burst
// on one topic that was delivered before is still delivered.
const DefaultTopicBuffer = 1 << 16

// DefaultShardBuffer is the default BrokerOptions.ShardBuffer.
const DefaultShardBuffer = 1 << 16

// Reasons a Broker drops a message: the reason label of
// fabric_broker_dropped_total (see Broker).
const (
	// DropShardFull is nats.go's drop of a message for a full shard channel.
	DropShardFull = "shard_full"
	// DropTopicBacklog is the drop of a message whose topic had TopicBuffer waiting.
	DropTopicBacklog = "topic_backlog"
	// DropUnsubscribed is the drop of a message for a stopped subscription.
	DropUnsubscribed = "unsubscribed"
)

const (
	// drainBatch bounds the messages a shard moves from its channel to
	// topic queues before each delivery, so that a flood cannot keep the
	// shard sorting without ever delivering.
	drainBatch = 512
	// turnBatch is the most messages of one topic delivered per turn.
	turnBatch = 16
	// ringMin is the capacity of a topic queue when it first holds a
	// message; ringKeep the largest capacity kept while the topic is quiet.
	ringMin, ringKeep = 8, 64
	// quietAfter is how often a shard releases the big queues of topics that
	// stayed empty since the previous time (so after 1–2 intervals).
	quietAfter = time.Second
	// tickEvery is how many busy passes a shard makes between looks at its
	// quiet ticker.
	tickEvery = 256
)

// BrokerOptions configures NewBroker. The zero value is usable.
type BrokerOptions struct {
	// Prefix is the first subject token (default "fabric"); instances that
	// share topics must share it, and different prefixes isolate tenants.
	Prefix string
	// Shards is the number of delivery goroutines; the messages of one topic
	// always go through the same one, in order. Default: GOMAXPROCS.
	Shards int
	// ShardBuffer is the length of each shard's channel, where nats.go hands
	// messages over (default DefaultShardBuffer, 65,536). The shard empties
	// it into topic queues at once, so it fills only when messages arrive
	// faster than a shard can sort them: nats.go then drops, reason
	// shard_full.
	ShardBuffer int
	// TopicBuffer is how many messages of one topic may wait for delivery
	// (default DefaultTopicBuffer, 65,536). Past it, that topic's newest
	// messages are dropped, reason topic_backlog; other topics are not
	// affected. A topic's queue grows with its backlog (8 bytes a slot,
	// plus the messages) and is released once the topic has been quiet
	// for a second or two. Lower it to bound how stale a flooded topic's
	// messages get, and the memory: every topic of a shard can hold this
	// many messages at once.
	TopicBuffer int
}

// Broker is the fabric.Broker on core NATS subjects: one subscription per
// topic with local subscribers, delivered through a few shard goroutines
// (a topic always hashes to the same one) instead of a goroutine per
// subscription.
//
// Each shard empties its channel into per-topic queues at once and delivers
// the topics that have messages waiting in turn, at most 16 messages of one
// topic per turn: a topic that floods its shard delays another by at most
// one turn per round and costs it none of its messages. The channel is only
// a hand-off, so one topic's backlog is bounded by TopicBuffer.
//
// Guarantees: the messages of one topic reach its Receiver in the order the
// connection received them, one call at a time. Delivery is at most once;
// NATS itself may lose messages (a connection cut as a slow consumer by its
// server loses what was in flight; fabric_nats_reconnects_total counts the
// reconnections). The broker drops, and counts in
// fabric_broker_dropped_total by reason:
//   - topic_backlog: the topic already had TopicBuffer messages waiting
//     (its Receiver is slower than its publishers); only that topic loses;
//   - shard_full: the shard's channel was full (ShardBuffer), i.e. the
//     shard could not even sort arriving messages into topic queues;
//   - unsubscribed: the message reached the broker, or was still waiting,
//     after its subscription was stopped (or the broker closed).
//
// A message that arrives while its subscription is being registered is
// delivered, and a stopped subscription's messages never reach a later
// subscription of the same topic.
type Broker struct {
	nc          *nats.Conn
	prefix      string
	topicBuffer int
	seed        maphash.Seed
	shards      []*natsShard
	done        chan struct{}
	wg          sync.WaitGroup
	subs        sync.Map // *nats.Subscription → *natsSub

	// mu serializes registration (Subscribe stores under it, so a lookup
	// that misses takes it to wait for a registration under way), the
	// transfer of a stopped subscription's drop count, and Collect.
	mu        sync.Mutex
	closed    bool
	shardFull int64 // shard_full drops of stopped subscriptions; under mu
}

// natsShard is one delivery goroutine's state. Everything but the channel
// and the counters belongs to its goroutine.
type natsShard struct {
	b      *Broker
	ch     chan *nats.Msg
	active ring[*natsSub] // topics with messages waiting, in turn order
	quiet  []*natsSub     // topics whose big queue emptied, to release
	gen    uint64         // quiet sweeps made

	backlog atomic.Int64 // topic_backlog drops
	unsub   atomic.Int64 // unsubscribed drops
}

type natsSub struct {
	b       *Broker
	sub     *nats.Subscription
	r       fabric.Receiver
	stopped atomic.Bool
	dropped int64 // sub.Dropped() last read; under b.mu

	// Owned by the shard goroutine.
	q       ring[*nats.Msg]
	queued  bool   // in the shard's active ring
	listed  bool   // in the shard's quiet list
	emptied uint64 // shard gen when q last became empty
}

// NewBroker returns a Broker publishing on nc. The caller keeps owning
// nc; Close stops the broker's subscriptions and goroutines, not nc.
func NewBroker(nc *nats.Conn, opts BrokerOptions) *Broker {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Shards <= 0 {
		opts.Shards = runtime.GOMAXPROCS(0)
	}
	if opts.ShardBuffer <= 0 {
		opts.ShardBuffer = DefaultShardBuffer
	}
	if opts.TopicBuffer <= 0 {
		opts.TopicBuffer = DefaultTopicBuffer
	}
	b := &Broker{
		nc: nc, prefix: opts.Prefix, topicBuffer: opts.TopicBuffer,
		seed: maphash.MakeSeed(), done: make(chan struct{}),
	}
	for range opts.Shards {
		s := &natsShard{b: b, ch: make(chan *nats.Msg, opts.ShardBuffer)}
		b.shards = append(b.shards, s)
		b.wg.Add(1)
		go s.run()
	}
	return b
}

// Conn returns the NATS connection the broker publishes on.
func (b *Broker) Conn() *nats.Conn { return b.nc }

// Prefix returns the subject prefix.
func (b *Broker) Prefix() string { return b.prefix }

// Publish implements Broker. It never flushes: nats.go's flusher coalesces
// every publish made while it writes into one socket write.
func (b *Broker) Publish(_ context.Context, topic string, envelope []byte) error {
	if err := b.nc.Publish(Subject(b.prefix, topic), envelope); err != nil {
		return fmt.Errorf("jetstream: publish %q: %w", clip(topic), err)
	}
	return nil
}

// Subscribe implements Broker.
func (b *Broker) Subscribe(topic string, r fabric.Receiver) (fabric.Subscription, error) {
	s := b.shards[maphash.String(b.seed, topic)%uint64(len(b.shards))]
	ns := &natsSub{b: b, r: r}
	// A message can reach the shard as soon as ChanSubscribe has sent the
	// interest, before Store: the shard's lookup misses, takes mu and so
	// waits for Store.
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, errors.New("jetstream: broker closed")
	}
	sub, err := b.nc.ChanSubscribe(Subject(b.prefix, topic), s.ch)
	if err != nil {
		return nil, fmt.Errorf("jetstream: subscribe %q: %w", clip(topic), err)
	}
	ns.sub = sub
	b.subs.Store(sub, ns)
	return ns, nil
}

// Unsubscribe implements Subscription. Messages still waiting for the
// subscription are dropped (reason unsubscribed); a Receive already under
// way may finish after it returns.
func (s *natsSub) Unsubscribe() error {
	if !s.stopped.CompareAndSwap(false, true) {
		return nil
	}
	b := s.b
	b.mu.Lock()
	s.readDropped()
	b.shardFull += s.dropped
	b.subs.Delete(s.sub)
	b.mu.Unlock()
	err := s.sub.Unsubscribe()
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
		return nil
	}
	return err
}

// readDropped updates s.dropped from nats.go, which forgets it once the
// subscription is closed. b.mu is held.
func (s *natsSub) readDropped() {
	if d, err := s.sub.Dropped(); err == nil && int64(d) > s.dropped {
		s.dropped = int64(d)
	}
}

// lookup returns the live subscription sub belongs to, or nil when it was
// stopped.
func (b *Broker) lookup(sub *nats.Subscription) *natsSub {
	if v, ok := b.subs.Load(sub); ok {
		return v.(*natsSub)
	}
	// Being registered (Subscribe holds mu until it is stored) or stopped.
	b.mu.Lock()
	v, ok := b.subs.Load(sub)
	b.mu.Unlock()
	if ok {
		return v.(*natsSub)
	}
	return nil
}

// drops returns the messages dropped so far, by reason.
func (b *Broker) drops() (shardFull, backlog, unsub int64) {
	b.mu.Lock()
	shardFull = b.shardFull
	b.subs.Range(func(_, v any) bool {
		ns := v.(*natsSub)
		ns.readDropped()
		shardFull += ns.dropped
		return true
	})
	b.mu.Unlock()
	for _, s := range b.shards {
		backlog += s.backlog.Load()
		unsub += s.unsub.Load()
	}
	return shardFull, backlog, unsub
}

// Dropped returns how many messages the broker dropped, for every reason.
func (b *Broker) Dropped() int64 {
	f, q, u := b.drops()
	return f + q + u
}

var (
	brokerDroppedDesc = prometheus.NewDesc("fabric_broker_dropped_total",
		"Messages the NATS broker received but did not deliver, by reason (shard_full, topic_backlog, unsubscribed).",
		[]string{"reason"}, nil)
	natsReconnectsDesc = prometheus.NewDesc("fabric_nats_reconnects_total",
		"Reconnections of the broker's NATS connection (a cut connection loses the messages in flight to it).",
		nil, nil)
)

// Describe implements prometheus.Collector.
func (b *Broker) Describe(ch chan<- *prometheus.Desc) {
	ch <- brokerDroppedDesc
	ch <- natsReconnectsDesc
}

// Collect implements prometheus.Collector.
func (b *Broker) Collect(ch chan<- prometheus.Metric) {
	f, q, u := b.drops()
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(f), DropShardFull)
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(q), DropTopicBacklog)
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(u), DropUnsubscribed)
	ch <- prometheus.MustNewConstMetric(natsReconnectsDesc, prometheus.CounterValue, float64(b.nc.Stats().Reconnects))
}

// Close implements Broker. Messages still waiting are dropped (reason
// unsubscribed).
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	var all []*natsSub
	b.subs.Range(func(_, v any) bool {
		all = append(all, v.(*natsSub))
		return true
	})
	b.mu.Unlock()
	for _, ns := range all {
		_ = ns.Unsubscribe()
	}
	// Every subscription is closed: nats.go sends nothing more to the
	// shards' channels.
	close(b.done)
	b.wg.Wait()
	return nil
}

// run delivers the shard's messages: it moves what has arrived on the
// channel into topic queues, at most drainBatch at a time and again before
// every delivery, and gives the topics with messages waiting one turn each
// in a circle. Sorting a message costs far less than delivering it, so the
// channel stays nearly empty and an overload lands in the queue of the
// topic that causes it.
func (s *natsShard) run() {
	defer s.b.wg.Done()
	tick := time.NewTicker(quietAfter)
	defer tick.Stop()
	for pass := 1; ; pass++ {
		if s.active.n == 0 {
			select {
			case m := <-s.ch:
				s.enqueue(m)
			case <-tick.C:
				s.sweep()
				continue
			case <-s.b.done:
				s.discard()
				return
			}
		} else if pass%tickEvery == 0 {
			select {
			case <-tick.C:
				s.sweep()
			default:
			}
		}
		s.drain()
		s.turn()
	}
}

// drain moves up to drainBatch waiting messages into topic queues.
func (s *natsShard) drain() {
	for range drainBatch {
		select {
		case m := <-s.ch:
			s.enqueue(m)
		default:
			return
		}
	}
}

// enqueue queues m for its topic, or drops it.
func (s *natsShard) enqueue(m *nats.Msg) {
	ns := s.b.lookup(m.Sub)
	if ns == nil || ns.stopped.Load() {
		s.unsub.Add(1)
		return
	}
	if ns.q.n >= s.b.topicBuffer {
		s.backlog.Add(1)
		return
	}
	ns.q.push(m)
	if !ns.queued {
		ns.queued = true
		s.active.push(ns)
	}
}

// turn delivers up to turnBatch messages of the topic whose turn it is,
// draining the channel before each, and puts the topic back at the end of
// the line if it has more.
func (s *natsShard) turn() {
	if s.active.n == 0 {
		return
	}
	ns := s.active.pop()
	for i := 0; i < turnBatch && ns.q.n > 0 && !ns.stopped.Load(); i++ {
		if i > 0 {
			s.drain()
		}
		m := ns.q.pop()
		seq, prev := headerSeqs(m)
		ns.r.Receive(m.Data, seq, prev)
	}
	switch {
	case ns.stopped.Load():
		s.unsub.Add(int64(ns.q.n))
		ns.q = ring[*nats.Msg]{}
		ns.queued = false
	case ns.q.n > 0:
		s.active.push(ns)
	default:
		ns.queued = false
		if len(ns.q.buf) > ringKeep {
			ns.emptied = s.gen
			if !ns.listed {
				ns.listed = true
				s.quiet = append(s.quiet, ns)
			}
		}
	}
}

// sweep releases the big queues of topics that have stayed empty since the
// previous sweep.
func (s *natsShard) sweep() {
	keep := s.quiet[:0]
	for _, ns := range s.quiet {
		switch {
		case ns.q.n > 0: // busy again; listed anew when it empties
			ns.listed = false
		case ns.emptied < s.gen || ns.stopped.Load():
			ns.q = ring[*nats.Msg]{}
			ns.listed = false
		default:
			keep = append(keep, ns)
		}
	}
	clear(s.quiet[len(keep):])
	s.quiet = keep
	s.gen++
}

// discard counts what is left when the broker closes: every subscription
// was stopped first, so only the channel can still hold messages.
func (s *natsShard) discard() {
	for {
		select {
		case <-s.ch:
			s.unsub.Add(1)
		default:
			return
		}
	}
}

// ring is a FIFO on a power-of-two circular buffer that grows by doubling.
type ring[T any] struct {
	buf  []T
	head int
	n    int
}

func (r *ring[T]) push(v T) {
	if r.n == len(r.buf) {
		nb := make([]T, max(2*len(r.buf), ringMin))
		k := copy(nb, r.buf[r.head:])
		copy(nb[k:], r.buf[:r.head])
		r.buf, r.head = nb, 0
	}
	r.buf[(r.head+r.n)&(len(r.buf)-1)] = v
	r.n++
}

func (r *ring[T]) pop() T {
	var zero T
	v := r.buf[r.head]
	r.buf[r.head] = zero
	r.head = (r.head + 1) & (len(r.buf) - 1)
	r.n--
	return v
}

// headerSeqs reads the stream sequence JetStream adds to a republished
// message, and the sequence of the subject's previous message.
func headerSeqs(m *nats.Msg) (seq, prev uint64) {
	if m.Header == nil {
		return 0, 0
	}
	v := m.Header.Get(nats.JSSequence)
	if v == "" {
		return 0, 0
	}
	seq, _ = strconv.ParseUint(v, 10, 64)
	prev = fabric.UnknownSeq
	if v := m.Header.Get(nats.JSLastSequence); v != "" {
		if p, err := strconv.ParseUint(v, 10, 64); err == nil {
			prev = p
		}
	}
	return seq, prev
}
