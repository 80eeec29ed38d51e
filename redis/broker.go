package redis

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
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"
)

// Defaults of BrokerOptions.
const (
	// DefaultTopicBuffer is how many messages of one topic may wait for
	// delivery (jetstream's default).
	DefaultTopicBuffer = 1 << 16
	// DefaultShardBuffer is the length of each shard's hand-off channel.
	DefaultShardBuffer = 1 << 16
)

// Reasons a Broker drops a message: the reason label of
// fabric_broker_dropped_total (see Broker).
const (
	// DropShardFull is the drop of a message whose shard's hand-off
	// channel was full.
	DropShardFull = "shard_full"
	// DropTopicBacklog is the drop of a message whose topic had
	// TopicBuffer waiting.
	DropTopicBacklog = "topic_backlog"
	// DropUnsubscribed is the drop of a message for a stopped
	// subscription (or for a channel nobody here subscribes to any more).
	DropUnsubscribed = "unsubscribed"
	// DropMalformed is the drop of a message without Fabric's header (not
	// published by Fabric).
	DropMalformed = "malformed"
)

const (
	drainBatch        = 512
	turnBatch         = 16
	ringMin, ringKeep = 8, 64
	quietAfter        = time.Second
	tickEvery         = 256
)

// Headers of a message on a topic channel: the first byte says what
// follows.
const (
	// hdrPlain: the envelope of a publish without history.
	hdrPlain = 0
	// hdrStored: "<seq>:<prev>:" in decimal, then the envelope of a stored
	// message (appendScript writes it).
	hdrStored = 1
)

// BrokerOptions tunes the delivery of every Broker of a Backend
// (Options.Broker). The zero value has the defaults.
type BrokerOptions struct {
	// Shards is the number of delivery goroutines per Broker; the messages
	// of one topic always go through the same one, in order. Default:
	// GOMAXPROCS.
	Shards int
	// ShardBuffer is the length of each shard's channel, where the pub/sub
	// connection hands messages over (default 65,536); past it, messages
	// are dropped, reason shard_full.
	ShardBuffer int
	// TopicBuffer is how many messages of one topic may wait for delivery
	// (default 65,536); past it that topic's newest messages are dropped,
	// reason topic_backlog, and other topics are not affected.
	TopicBuffer int
}

// Broker is fabric.Broker on Redis pub/sub: one channel per topic
// ("<prefix>:{P}:t:<topic>"), subscribed on the backend's pub/sub
// connection while a Node here has subscribers, and a PUBLISH (SPUBLISH on
// a cluster) per message. Each message carries a one-byte header: 0 and
// the envelope for a plain publish; 1, "<seq>:<prev>:" and the envelope for
// a stored message (published by History.Append's script).
//
// Delivery is jetstream.Broker's: the connection's reader hands messages
// to a few shard goroutines (a topic always hashes to the same one), each
// of which sorts them into per-topic queues and delivers the topics with
// messages waiting in turn, at most 16 messages of one topic per turn, so a
// flooded topic delays another by at most one turn and costs it none of
// its messages.
//
// Guarantees: the messages of one topic reach its Receiver in the order
// Redis ran the publishes, one call at a time. Delivery is at most once.
// Redis itself loses what is in flight when the pub/sub connection breaks
// (a network cut, a restart, or Redis closing a subscriber past its
// client-output-buffer-limit for pubsub, 32 MB hard or 8 MB for 60 s by
// default); the backend reconnects with backoff and resubscribes, and
// fabric_redis_pubsub_reconnects_total counts it. The broker drops, and
// counts in fabric_broker_dropped_total by reason: topic_backlog (the
// topic's queue held TopicBuffer), shard_full (a shard's channel was
// full), unsubscribed (the message arrived or waited after its
// subscription stopped), malformed (not framed by Fabric).
//
// Subscribe returns once Redis has confirmed the subscription (or at once
// while the pub/sub connection is down: the topic is subscribed when it is
// back), so a history read made after it cannot miss a message published
// before the subscription took effect.
type Broker struct {
	b           *Backend
	topicBuffer int
	seed        maphash.Seed
	shards      []*shard
	done        chan struct{}
	wg          sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	subs      map[*subscription]struct{}
	shardFull atomic.Int64
	malformed atomic.Int64
}

// shard is one delivery goroutine's state; everything but the channel and
// the counters belongs to its goroutine.
type shard struct {
	br     *Broker
	ch     chan delivery
	active ring[*subscription]
	quiet  []*subscription
	gen    uint64

	backlog atomic.Int64
	unsub   atomic.Int64
}

// delivery is one message on its way to a subscription.
type delivery struct {
	sub     *subscription
	payload string
}

// subscription is one topic's feed to a Receiver.
type subscription struct {
	br      *Broker
	sh      *shard
	topic   string
	channel string
	r       fabric.Receiver
	stopped atomic.Bool

	// delivered is the last seq handed to r; History.Append waits for it
	// (see Backend.awaitLocal).
	delivered atomic.Uint64
	waiting   atomic.Int32
	wakeMu    sync.Mutex
	wake      chan struct{}

	// Owned by the shard goroutine.
	q       ring[string]
	queued  bool
	listed  bool
	emptied uint64
}

// Broker returns a new Broker on the backend's pub/sub connection. Give
// each Node its own; Close stops its subscriptions only.
func (b *Backend) Broker() *Broker {
	o := b.opts.Broker
	if o.Shards <= 0 {
		o.Shards = runtime.GOMAXPROCS(0)
	}
	if o.ShardBuffer <= 0 {
		o.ShardBuffer = DefaultShardBuffer
	}
	if o.TopicBuffer <= 0 {
		o.TopicBuffer = DefaultTopicBuffer
	}
	br := &Broker{b: b, topicBuffer: o.TopicBuffer, seed: maphash.MakeSeed(), done: make(chan struct{}),
		subs: map[*subscription]struct{}{}}
	for range o.Shards {
		s := &shard{br: br, ch: make(chan delivery, o.ShardBuffer)}
		br.shards = append(br.shards, s)
		br.wg.Add(1)
		go s.run()
	}
	if !b.onClose(func() { _ = br.Close() }) {
		br.closed = true
		close(br.done)
		br.wg.Wait()
	}
	return br
}

// Publish implements fabric.Broker: one PUBLISH (SPUBLISH on a cluster),
// returned once Redis has taken it. Under the backend's circuit breaker:
// while Redis is unreachable, publishes fail at once.
func (br *Broker) Publish(ctx context.Context, topic string, envelope []byte) error {
	if br.isClosed() {
		return fmt.Errorf("redis: publish %q: broker %w", clip(topic), ErrClosed)
	}
	payload := make([]byte, 1+len(envelope))
	payload[0] = hdrPlain
	copy(payload[1:], envelope)
	return br.b.publish(ctx, "publish "+strconv.Quote(clip(topic)), br.b.topicChannel(topic), rueidis.BinaryString(payload))
}

func (br *Broker) isClosed() bool {
	br.mu.Lock()
	defer br.mu.Unlock()
	return br.closed
}

// Subscribe implements fabric.Broker.
func (br *Broker) Subscribe(topic string, r fabric.Receiver) (fabric.Subscription, error) {
	if r == nil {
		return nil, errors.New("redis: subscribe: nil receiver")
	}
	sub := &subscription{br: br, topic: topic, channel: br.b.topicChannel(topic), r: r,
		sh: br.shards[maphash.String(br.seed, topic)%uint64(len(br.shards))], wake: make(chan struct{})}
	br.mu.Lock()
	if br.closed {
		br.mu.Unlock()
		return nil, fmt.Errorf("redis: subscribe %q: broker %w", clip(topic), ErrClosed)
	}
	br.subs[sub] = struct{}{}
	br.mu.Unlock()
	br.b.addLocal(sub)
	ctx, cancel := context.WithTimeout(context.Background(), br.b.opts.Timeout)
	defer cancel()
	if err := br.b.ps.subscribe(ctx, sub.channel, sub, true); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("redis: subscribe %q: %w", clip(topic), unavailable(err))
	}
	return sub, nil
}

// onMessage implements psHandler: it hands the message to the shard.
func (s *subscription) onMessage(payload string) {
	if s.stopped.Load() {
		s.sh.unsub.Add(1)
		return
	}
	select {
	case s.sh.ch <- delivery{sub: s, payload: payload}:
	default:
		s.br.shardFull.Add(1)
	}
}

// Unsubscribe implements fabric.Subscription. Messages still waiting for
// the subscription are dropped (reason unsubscribed); a Receive already
// under way may finish after it returns.
func (s *subscription) Unsubscribe() error {
	if !s.stopped.CompareAndSwap(false, true) {
		return nil
	}
	s.br.b.ps.unsubscribe(s.channel, s)
	s.br.b.removeLocal(s)
	s.advance(^uint64(0)) // release waiting appends
	s.br.mu.Lock()
	delete(s.br.subs, s)
	s.br.mu.Unlock()
	return nil
}

// Close implements fabric.Broker: it stops this Broker's subscriptions and
// goroutines (not those of the backend's other Brokers). Messages still
// waiting are dropped (reason unsubscribed).
func (br *Broker) Close() error {
	br.mu.Lock()
	if br.closed {
		br.mu.Unlock()
		return nil
	}
	br.closed = true
	all := make([]*subscription, 0, len(br.subs))
	for s := range br.subs {
		all = append(all, s)
	}
	br.mu.Unlock()
	for _, s := range all {
		_ = s.Unsubscribe()
	}
	close(br.done)
	br.wg.Wait()
	return nil
}

// Dropped returns how many messages the broker dropped, for every reason.
func (br *Broker) Dropped() int64 {
	f, q, u, m := br.drops()
	return f + q + u + m
}

func (br *Broker) drops() (shardFull, backlog, unsub, malformed int64) {
	for _, s := range br.shards {
		backlog += s.backlog.Load()
		unsub += s.unsub.Load()
	}
	return br.shardFull.Load(), backlog, unsub, br.malformed.Load()
}

var (
	brokerDroppedDesc = prometheus.NewDesc("fabric_broker_dropped_total",
		"Messages the Redis broker received but did not deliver, by reason (shard_full, topic_backlog, unsubscribed, malformed).",
		[]string{"reason"}, nil)
	reconnectsDesc = prometheus.NewDesc("fabric_redis_pubsub_reconnects_total",
		"Reconnections of the Redis pub/sub connection after it broke (a cut connection loses the messages in flight to it).",
		nil, nil)
	orphansDesc = prometheus.NewDesc("fabric_redis_pubsub_orphans_total",
		"Messages that arrived on the Redis pub/sub connection for a channel nobody here subscribes to any more.",
		nil, nil)
)

// Describe implements prometheus.Collector.
func (br *Broker) Describe(ch chan<- *prometheus.Desc) {
	ch <- brokerDroppedDesc
	ch <- reconnectsDesc
	ch <- orphansDesc
}

// Collect implements prometheus.Collector.
func (br *Broker) Collect(ch chan<- prometheus.Metric) {
	f, q, u, m := br.drops()
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(f), DropShardFull)
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(q), DropTopicBacklog)
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(u), DropUnsubscribed)
	ch <- prometheus.MustNewConstMetric(brokerDroppedDesc, prometheus.CounterValue, float64(m), DropMalformed)
	ch <- prometheus.MustNewConstMetric(reconnectsDesc, prometheus.CounterValue, float64(br.b.ps.reconnects.Load()))
	ch <- prometheus.MustNewConstMetric(orphansDesc, prometheus.CounterValue, float64(br.b.ps.orphans.Load()))
}

// Reconnects returns how many times the backend's pub/sub connections were
// re-established after breaking.
func (b *Backend) Reconnects() int64 { return b.ps.reconnects.Load() }

// run delivers the shard's messages (see jetstream.Broker): it moves what
// arrived into topic queues, at most drainBatch at a time and again before
// every delivery, and gives the topics with messages waiting one turn each.
func (s *shard) run() {
	defer s.br.wg.Done()
	tick := time.NewTicker(quietAfter)
	defer tick.Stop()
	for pass := 1; ; pass++ {
		if s.active.n == 0 {
			select {
			case d := <-s.ch:
				s.enqueue(d)
			case <-tick.C:
				s.sweep()
				continue
			case <-s.br.done:
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

func (s *shard) drain() {
	for range drainBatch {
		select {
		case d := <-s.ch:
			s.enqueue(d)
		default:
			return
		}
	}
}

func (s *shard) enqueue(d delivery) {
	sub := d.sub
	if sub.stopped.Load() {
		s.unsub.Add(1)
		return
	}
	if sub.q.n >= s.br.topicBuffer {
		s.backlog.Add(1)
		return
	}
	sub.q.push(d.payload)
	if !sub.queued {
		sub.queued = true
		s.active.push(sub)
	}
}

func (s *shard) turn() {
	if s.active.n == 0 {
		return
	}
	sub := s.active.pop()
	for i := 0; i < turnBatch && sub.q.n > 0 && !sub.stopped.Load(); i++ {
		if i > 0 {
			s.drain()
		}
		env, seq, prev, ok := parseFrame(sub.q.pop())
		if !ok {
			s.br.malformed.Add(1)
			continue
		}
		sub.r.Receive(env, seq, prev)
		if seq > 0 {
			sub.advance(seq)
		}
	}
	switch {
	case sub.stopped.Load():
		s.unsub.Add(int64(sub.q.n))
		sub.q = ring[string]{}
		sub.queued = false
	case sub.q.n > 0:
		s.active.push(sub)
	default:
		sub.queued = false
		if len(sub.q.buf) > ringKeep {
			sub.emptied = s.gen
			if !sub.listed {
				sub.listed = true
				s.quiet = append(s.quiet, sub)
			}
		}
	}
}

func (s *shard) sweep() {
	keep := s.quiet[:0]
	for _, sub := range s.quiet {
		switch {
		case sub.q.n > 0:
			sub.listed = false
		case sub.emptied < s.gen || sub.stopped.Load():
			sub.q = ring[string]{}
			sub.listed = false
		default:
			keep = append(keep, sub)
		}
	}
	clear(s.quiet[len(keep):])
	s.quiet = keep
	s.gen++
}

func (s *shard) discard() {
	for {
		select {
		case <-s.ch:
			s.unsub.Add(1)
		default:
			return
		}
	}
}

// advance records that seq was handed to the receiver and wakes the
// appends waiting for it.
func (s *subscription) advance(seq uint64) {
	s.delivered.Store(seq)
	if s.waiting.Load() == 0 {
		return
	}
	s.wakeMu.Lock()
	close(s.wake)
	s.wake = make(chan struct{})
	s.wakeMu.Unlock()
}

// await returns once seq (or a later one) was handed to the receiver, the
// subscription stopped, or done is closed.
func (s *subscription) await(seq uint64, done <-chan struct{}) {
	s.waiting.Add(1)
	defer s.waiting.Add(-1)
	for {
		s.wakeMu.Lock()
		ch := s.wake
		s.wakeMu.Unlock()
		if s.delivered.Load() >= seq || s.stopped.Load() {
			return
		}
		select {
		case <-ch:
		case <-done:
			return
		}
	}
}

// parseFrame splits a topic channel's message into envelope, seq and prev.
func parseFrame(p string) (env []byte, seq, prev uint64, ok bool) {
	if len(p) == 0 {
		return nil, 0, 0, false
	}
	switch p[0] {
	case hdrPlain:
		return []byte(p[1:]), 0, 0, true
	case hdrStored:
		rest := p[1:]
		var n int
		if seq, n, ok = parseUint(rest); !ok || seq == 0 {
			return nil, 0, 0, false
		}
		rest = rest[n:]
		if prev, n, ok = parseUint(rest); !ok {
			return nil, 0, 0, false
		}
		return []byte(rest[n:]), seq, prev, true
	}
	return nil, 0, 0, false
}

// parseUint reads decimal digits up to a ':' and returns the value and how
// many bytes it took, the ':' included.
func parseUint(s string) (uint64, int, bool) {
	var v uint64
	for i := 0; i < len(s) && i < 21; i++ {
		c := s[i]
		if c == ':' {
			return v, i + 1, i > 0
		}
		if c < '0' || c > '9' {
			return 0, 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return 0, 0, false
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

var (
	_ fabric.Broker        = (*Broker)(nil)
	_ fabric.Subscription  = (*subscription)(nil)
	_ prometheus.Collector = (*Broker)(nil)
)
