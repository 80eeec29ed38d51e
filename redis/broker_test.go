package redis_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// blockingReceiver blocks in Receive until released, counting messages.
type blockingReceiver struct {
	got     atomic.Int64
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (r *blockingReceiver) Receive([]byte, uint64, uint64) {
	r.once.Do(func() { close(r.entered) })
	<-r.release
	r.got.Add(1)
}

// slowReceiver spends a while on each message, keeping its numbers.
type slowReceiver struct {
	mu   sync.Mutex
	nums []int
	work time.Duration
}

func (r *slowReceiver) Receive(env []byte, _, _ uint64) {
	if r.work > 0 {
		for t0 := time.Now(); time.Since(t0) < r.work; {
		}
	}
	var v struct{ N int }
	_ = json.Unmarshal(env, &v)
	r.mu.Lock()
	r.nums = append(r.nums, v.N)
	r.mu.Unlock()
}

func (r *slowReceiver) numbers() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.nums)
}

// TestBrokerFairness: a flooded topic whose receiver is slow shares the
// only shard with a paced one. The paced topic gets every message, in
// order; the flooded one's excess past TopicBuffer is dropped and counted
// (topic_backlog), and its deliveries plus its drops add up to what was
// published.
func TestBrokerFairness(t *testing.T) {
	b := sharedBackend(t, redis.Options{Broker: redis.BrokerOptions{Shards: 1, TopicBuffer: 64}})
	br := b.Broker()
	hot, paced := &slowReceiver{work: 200 * time.Microsecond}, &slowReceiver{}
	if _, err := br.Subscribe("hot", hot); err != nil {
		t.Fatal(err)
	}
	if _, err := br.Subscribe("paced", paced); err != nil {
		t.Fatal(err)
	}
	pub := newBackend(t, redis.Options{URL: needRedis(t), Prefix: b.Options().Prefix}).Broker()
	ctx := context.Background()
	const flooders, each = 8, 500
	var wg sync.WaitGroup
	for range flooders {
		wg.Go(func() {
			for i := range each {
				if err := pub.Publish(ctx, "hot", fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	fabrictest.WaitFor(t, 10*time.Second, "the hot topic to overflow", func() bool {
		return metric(br, "fabric_broker_dropped_total", redis.DropTopicBacklog) > 0
	})
	for i := range 100 {
		if err := pub.Publish(ctx, "paced", fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	fabrictest.WaitFor(t, 10*time.Second, "every paced message", func() bool { return len(paced.numbers()) == 100 })
	for i, n := range paced.numbers() {
		if n != i {
			t.Fatalf("paced message %d is %d", i, n)
		}
	}
	fabrictest.WaitFor(t, 20*time.Second, "every hot message delivered or counted", func() bool {
		return float64(len(hot.numbers()))+metric(br, "fabric_broker_dropped_total", redis.DropTopicBacklog) == flooders*each
	})
	if n := metric(br, "fabric_broker_dropped_total", redis.DropShardFull); n != 0 {
		t.Fatalf("shard_full drops: %v", n)
	}
	t.Logf("hot: %d delivered, %v dropped (topic_backlog)", len(hot.numbers()), metric(br, "fabric_broker_dropped_total", redis.DropTopicBacklog))
}

// metric returns the value of the broker's series name (with reason, when
// not empty).
func metric(br *redis.Broker, name, reason string) float64 {
	ch := make(chan prometheus.Metric, 16)
	br.Collect(ch)
	close(ch)
	for m := range ch {
		if !strings.Contains(m.Desc().String(), `"`+name+`"`) {
			continue
		}
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			continue
		}
		if reason != "" && (len(d.Label) == 0 || d.Label[0].GetValue() != reason) {
			continue
		}
		return d.GetCounter().GetValue()
	}
	return -1
}

// envReceiver keeps the envelopes it gets.
type envReceiver struct {
	mu   sync.Mutex
	envs []string
}

func (r *envReceiver) Receive(env []byte, _, _ uint64) {
	r.mu.Lock()
	r.envs = append(r.envs, string(env))
	r.mu.Unlock()
}

func (r *envReceiver) has(env string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.envs, env)
}

// TestBrokerUnsubscribe: a stopped subscription gets nothing more (what
// waited for it counts as unsubscribed), and a new subscription of the
// topic made right after gets what is published after it. (Messages of the
// topic still on their way when the new subscription starts may reach it
// too: Redis subscriptions are per channel.)
func TestBrokerUnsubscribe(t *testing.T) {
	b := sharedBackend(t, redis.Options{Broker: redis.BrokerOptions{Shards: 1}})
	br := b.Broker()
	stuck := &blockingReceiver{entered: make(chan struct{}), release: make(chan struct{})}
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(stuck.release) }) }
	t.Cleanup(release) // before the backend's close waits for the shard
	sub, err := br.Subscribe("t", stuck)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for range 5 {
		if err := br.Publish(ctx, "t", []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	<-stuck.entered
	if err := sub.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if err := sub.Unsubscribe(); err != nil { // idempotent
		t.Fatal(err)
	}
	release()
	after := &envReceiver{}
	if _, err := br.Subscribe("t", after); err != nil {
		t.Fatal(err)
	}
	if err := br.Publish(ctx, "t", []byte(`{"after":1}`)); err != nil {
		t.Fatal(err)
	}
	fabrictest.WaitFor(t, 5*time.Second, "the new subscription's message", func() bool { return after.has(`{"after":1}`) })
	if got := stuck.got.Load(); got != 1 {
		t.Fatalf("the stopped subscription got %d messages, want only the one in progress", got)
	}
	if err := br.Close(); err != nil {
		t.Fatal(err)
	}
	if err := br.Publish(ctx, "t", []byte(`{}`)); err == nil {
		t.Fatal("publish on a closed broker succeeded")
	}
}

// TestPubSubConnectionKilled: Redis closing the pub/sub connection (as it
// does past client-output-buffer-limit pubsub) is survived: the backend
// reconnects, counts it, and subscriptions work again.
func TestPubSubConnectionKilled(t *testing.T) {
	p := startRedis(t) // CLIENT KILL would hit every test on a shared Redis
	b := newBackend(t, redis.Options{URL: p.url(), Prefix: fabrictest.TestPrefix(t)})
	r := &countReceiver{}
	br := b.Broker()
	if _, err := br.Subscribe("t", r); err != nil {
		t.Fatal(err)
	}
	c := rawClient(t, p.url())
	ctx := context.Background()
	if err := c.Do(ctx, c.B().ClientKill().TypePubsub().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	fabrictest.WaitFor(t, 10*time.Second, "a message after the reconnection", func() bool {
		_ = br.Publish(ctx, "t", []byte(`{}`))
		return r.got.Load() > 0 && b.Reconnects() == 1
	})
	if v := metric(br, "fabric_redis_pubsub_reconnects_total", ""); v != 1 {
		t.Fatalf("fabric_redis_pubsub_reconnects_total = %v", v)
	}
}

// TestBinaryTopics: topics are used as given in channel and key names
// (after the partition tag), whatever their characters.
func TestBinaryTopics(t *testing.T) {
	b := sharedBackend(t, redis.Options{})
	ctx := context.Background()
	all := func(string) bool { return true }
	n, err := fabric.NewNode(fabric.Config{Broker: b.Broker(), History: b.History(), Persistent: all})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	for _, topic := range []string{"a b", "{x}", "}{", "ünï:cødé", "a.b*>", "~tilde", strings.Repeat("z", 256)} {
		r := &countReceiver{}
		if _, err := b.Broker().Subscribe(topic, r); err != nil {
			t.Fatal(err)
		}
		seq, err := n.Publish(ctx, topic, "m", 1)
		if err != nil || seq != 1 {
			t.Fatalf("%q: seq %d, %v", topic, seq, err)
		}
		if r.last.Load() != 1 {
			t.Fatalf("%q: not delivered", topic)
		}
		if ch := b.TopicChannel(topic); !strings.HasSuffix(ch, ":t:"+topic) {
			t.Fatalf("%q: channel %q", topic, ch)
		}
	}
}
