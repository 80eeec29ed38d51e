package memory

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/fabricrt/fabric/fabric"
	"github.com/prometheus/client_golang/prometheus"
)

// shardCount spreads topics over independent locks.
const shardCount = 64

// genSlots is the number of eviction generations each shard keeps (see
// shard.gens).
const genSlots = 64

// shard holds part of the topics: their subscribers and their histories.
type shard struct {
	mu     sync.Mutex
	topics map[string]*topicState
	// head and tail are the ends of the list of the shard's topics that
	// have a history, most recently appended first.
	head, tail *topicState
	// gens counts the histories dropped by eviction, per slot of topic
	// hashes: a topic's epoch includes its slot's count, so that a topic
	// whose history was dropped reports another epoch without the backend
	// remembering it.
	gens [genSlots]uint32
}

// topicState is one topic's subscribers and history. It exists while it has
// either.
type topicState struct {
	name string
	hash uint64

	// subs is replaced (copy on write) under the shard lock; deliveries
	// read it without one.
	subs atomic.Pointer[[]*subscription]
	// hist is set and cleared under the shard lock; what it points to is
	// guarded by mu.
	hist atomic.Pointer[history]

	// Guarded by the shard lock.
	tick       uint64      // b.tick at the last append
	prev, next *topicState // the shard's history list

	// mu orders the topic's deliveries: one at a time, in the order
	// appended (seq order) or published.
	mu sync.Mutex
}

func (b *Backend) hash(name string) uint64 { return maphash.String(b.seed, name) }

func (b *Backend) shardOf(h uint64) *shard { return &b.shards[h%shardCount] }

func genSlot(h uint64) int { return int((h / shardCount) % genSlots) }

// lookup returns topic name's state, or nil.
func (b *Backend) lookup(name string) *topicState {
	s := b.shardOf(b.hash(name))
	s.mu.Lock()
	t := s.topics[name]
	s.mu.Unlock()
	return t
}

// deliver hands envelope to every live subscription of t. t.mu is held.
func (t *topicState) deliver(envelope []byte, seq, prev uint64) {
	p := t.subs.Load()
	if p == nil {
		return
	}
	for _, s := range *p {
		if !s.stopped.Load() {
			s.r.Receive(envelope, seq, prev)
		}
	}
}

// removeIfUnused deletes t from s once it has neither subscribers nor a
// history. s.mu is held.
func (s *shard) removeIfUnused(t *topicState) {
	if t.hist.Load() != nil {
		return
	}
	if p := t.subs.Load(); p != nil && len(*p) > 0 {
		return
	}
	if s.topics[t.name] == t {
		delete(s.topics, t.name)
	}
}

// Broker is fabric.Broker on a Backend. Each Broker returned by
// Backend.Broker has its own subscriptions (Close stops those only), and
// all of them deliver to one another.
//
// Publish delivers synchronously, before it returns, to every Receiver
// subscribed to the topic through any Broker of the backend, under a lock
// per topic: each Receiver gets a topic's messages one call at a time, in
// one order. A Receiver must therefore not publish to (or append to the
// history of) its own topic from inside Receive: that deadlocks. Nothing is
// buffered and nothing is dropped; a publish to a topic nobody subscribes
// to costs one map lookup.
type Broker struct {
	b *Backend

	mu     sync.Mutex
	subs   map[*subscription]struct{}
	closed atomic.Bool
}

// subscription is one Receiver's feed of one topic.
type subscription struct {
	br      *Broker
	topic   string
	r       fabric.Receiver
	stopped atomic.Bool
}

// Broker returns a new Broker on the backend. Give each Node its own (they
// may share one, but then closing it stops every Node's feeds).
func (b *Backend) Broker() *Broker {
	return &Broker{b: b, subs: map[*subscription]struct{}{}}
}

// Publish implements fabric.Broker: envelope reaches every subscriber of
// topic, on every Node of the backend, with seq 0, before Publish returns.
// ctx is not used: nothing waits.
func (br *Broker) Publish(_ context.Context, topic string, envelope []byte) error {
	if br.b.closed.Load() || br.closed.Load() {
		return fmt.Errorf("memory: publish %q: %w", clip(topic), ErrClosed)
	}
	t := br.b.lookup(topic)
	if t == nil {
		return nil
	}
	t.mu.Lock()
	t.deliver(envelope, 0, 0)
	t.mu.Unlock()
	return nil
}

// Subscribe implements fabric.Broker. Messages appended to the topic's
// history arrive with their seq and the previous one (see History).
func (br *Broker) Subscribe(topic string, r fabric.Receiver) (fabric.Subscription, error) {
	if r == nil {
		return nil, errors.New("memory: subscribe: nil receiver")
	}
	if br.b.closed.Load() {
		return nil, fmt.Errorf("memory: subscribe %q: %w", clip(topic), ErrClosed)
	}
	sub := &subscription{br: br, topic: topic, r: r}
	br.mu.Lock()
	if br.closed.Load() {
		br.mu.Unlock()
		return nil, fmt.Errorf("memory: subscribe %q: broker %w", clip(topic), ErrClosed)
	}
	br.subs[sub] = struct{}{}
	br.mu.Unlock()

	h := br.b.hash(topic)
	s := br.b.shardOf(h)
	s.mu.Lock()
	// An Unsubscribe (Close) that ran meanwhile has nothing to remove yet:
	// it set stopped first, so the feed is not added.
	if !sub.stopped.Load() {
		t := s.topics[topic]
		if t == nil {
			t = &topicState{name: topic, hash: h}
			s.topics[topic] = t
		}
		var next []*subscription
		if p := t.subs.Load(); p != nil {
			next = make([]*subscription, 0, len(*p)+1)
			next = append(next, *p...)
		}
		next = append(next, sub)
		t.subs.Store(&next)
		br.b.subCount.Add(1)
	}
	s.mu.Unlock()
	return sub, nil
}

// Unsubscribe implements fabric.Subscription. It is idempotent and may be
// called from inside Receive; a Receive already under way may finish after
// it returns, none starts later.
func (sub *subscription) Unsubscribe() error {
	if !sub.stopped.CompareAndSwap(false, true) {
		return nil
	}
	b := sub.br.b
	s := b.shardOf(b.hash(sub.topic))
	s.mu.Lock()
	if t := s.topics[sub.topic]; t != nil {
		if p := t.subs.Load(); p != nil {
			if i := slices.Index(*p, sub); i >= 0 {
				next := make([]*subscription, 0, len(*p)-1)
				next = append(next, (*p)[:i]...)
				next = append(next, (*p)[i+1:]...)
				t.subs.Store(&next)
				b.subCount.Add(-1)
				s.removeIfUnused(t)
			}
		}
	}
	s.mu.Unlock()
	sub.br.mu.Lock()
	delete(sub.br.subs, sub)
	sub.br.mu.Unlock()
	return nil
}

// Close implements fabric.Broker: it stops this Broker's subscriptions (not
// those of the backend's other Brokers); its later publishes and subscribes
// fail with ErrClosed. It is idempotent.
func (br *Broker) Close() error {
	br.mu.Lock()
	if br.closed.Swap(true) {
		br.mu.Unlock()
		return nil
	}
	subs := make([]*subscription, 0, len(br.subs))
	for s := range br.subs {
		subs = append(subs, s)
	}
	br.mu.Unlock()
	for _, s := range subs {
		_ = s.Unsubscribe()
	}
	return nil
}

// Describe implements prometheus.Collector: the backend's gauges (topics
// with a history, subscriptions) and its history evictions.
func (br *Broker) Describe(ch chan<- *prometheus.Desc) {
	ch <- br.b.descHistTopics
	ch <- br.b.descEvictions
	ch <- br.b.descSubs
}

// Collect implements prometheus.Collector.
func (br *Broker) Collect(ch chan<- prometheus.Metric) {
	b := br.b
	ch <- prometheus.MustNewConstMetric(b.descHistTopics, prometheus.GaugeValue, float64(b.histCount.Load()))
	ch <- prometheus.MustNewConstMetric(b.descEvictions, prometheus.CounterValue, float64(b.evictions.Load()))
	ch <- prometheus.MustNewConstMetric(b.descSubs, prometheus.GaugeValue, float64(b.subCount.Load()))
}

var (
	_ fabric.Broker        = (*Broker)(nil)
	_ fabric.Subscription  = (*subscription)(nil)
	_ prometheus.Collector = (*Broker)(nil)
)
