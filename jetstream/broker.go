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

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
)

// BrokerOptions configures NewBroker. The zero value is usable.
type BrokerOptions struct {
	// Prefix is the first subject token (default "fabric"); instances that
	// share topics must share it, and different prefixes isolate tenants.
	Prefix string
	// Shards is the number of delivery goroutines; the messages of one topic
	// always go through the same one, in order. Default: GOMAXPROCS.
	Shards int
	// ShardBuffer is each shard's queue length (default 65536). A shard that
	// falls this far behind drops messages, and Dropped counts them.
	ShardBuffer int
}

// Broker is the Broker on core NATS subjects: one subscription per topic
// with local subscribers, delivered through a few ordered shard goroutines
// instead of a goroutine per subscription.
type Broker struct {
	nc     *nats.Conn
	prefix string
	seed   maphash.Seed
	shards []*natsShard
	done   chan struct{}
	wg     sync.WaitGroup
	closed atomic.Bool
	subs   sync.Map // *nats.Subscription → *natsSub
}

type natsShard struct {
	ch chan *nats.Msg
}

type natsSub struct {
	b   *Broker
	sub *nats.Subscription
	r   fabric.Receiver
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
		opts.ShardBuffer = 1 << 16
	}
	b := &Broker{nc: nc, prefix: opts.Prefix, seed: maphash.MakeSeed(), done: make(chan struct{})}
	for range opts.Shards {
		s := &natsShard{ch: make(chan *nats.Msg, opts.ShardBuffer)}
		b.shards = append(b.shards, s)
		b.wg.Add(1)
		go b.run(s)
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
	if b.closed.Load() {
		return nil, errors.New("jetstream: broker closed")
	}
	s := b.shards[maphash.String(b.seed, topic)%uint64(len(b.shards))]
	ns := &natsSub{b: b, r: r}
	// Register before the first message can arrive on the shard.
	sub, err := b.nc.ChanSubscribe(Subject(b.prefix, topic), s.ch)
	if err != nil {
		return nil, fmt.Errorf("jetstream: subscribe %q: %w", clip(topic), err)
	}
	ns.sub = sub
	b.subs.Store(sub, ns)
	return ns, nil
}

// Unsubscribe implements Subscription.
func (s *natsSub) Unsubscribe() error {
	s.b.subs.Delete(s.sub)
	err := s.sub.Unsubscribe()
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
		return nil
	}
	return err
}

// Dropped returns how many messages NATS dropped because a shard was full.
func (b *Broker) Dropped() int64 {
	var n int64
	b.subs.Range(func(k, _ any) bool {
		if d, err := k.(*nats.Subscription).Dropped(); err == nil {
			n += int64(d)
		}
		return true
	})
	return n
}

// Close implements Broker.
func (b *Broker) Close() error {
	if !b.closed.CompareAndSwap(false, true) {
		return nil
	}
	b.subs.Range(func(k, v any) bool {
		_ = v.(*natsSub).Unsubscribe()
		return true
	})
	close(b.done)
	b.wg.Wait()
	return nil
}

func (b *Broker) run(s *natsShard) {
	defer b.wg.Done()
	for {
		select {
		case m := <-s.ch:
			v, ok := b.subs.Load(m.Sub)
			if !ok {
				continue // unsubscribed while the message was queued
			}
			seq, prev := headerSeqs(m)
			v.(*natsSub).r.Receive(m.Data, seq, prev)
		case <-b.done:
			return
		}
	}
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
