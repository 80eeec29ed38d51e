package redis_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
)

// countReceiver counts a subscription's messages and remembers the last
// seq.
type countReceiver struct {
	got  atomic.Int64
	last atomic.Uint64
}

func (r *countReceiver) Receive(_ []byte, seq, _ uint64) {
	r.got.Add(1)
	if seq > 0 {
		r.last.Store(seq)
	}
}

// TestRedisRestart: Redis (keeping nothing on disk) is killed while one
// instance publishes and another subscribes. Publishes fail fast with a
// clear error (the circuit breaker opens), nothing crashes; once Redis is
// back both instances reconnect by themselves, deliveries resume, and the
// persistent topic's history starts a new epoch (its old one is gone).
func TestRedisRestart(t *testing.T) {
	p := startRedis(t)
	prefix := fabrictest.TestPrefix(t)
	a := newBackend(t, redis.Options{URL: p.url(), Prefix: prefix, Timeout: time.Second})
	b := newBackend(t, redis.Options{URL: p.url(), Prefix: prefix, Timeout: time.Second})
	pub, sub := a.Broker(), b.Broker()
	plain, stored := &countReceiver{}, &countReceiver{}
	if _, err := sub.Subscribe("chat:x", plain); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Subscribe("feed:x", stored); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	env := fabric.Envelope("chat:x", "m", []byte(`1`))
	for range 10 {
		if err := pub.Publish(ctx, "chat:x", env); err != nil {
			t.Fatal(err)
		}
	}
	pos, err := a.History().Append(ctx, "feed:x", fabric.Envelope("feed:x", "m", []byte(`1`)), "")
	if err != nil {
		t.Fatal(err)
	}
	fabrictest.WaitFor(t, 10*time.Second, "the first messages", func() bool {
		return plain.got.Load() == 10 && stored.last.Load() == pos.Seq
	})

	p.kill()
	// Until the breaker opens, publishes fail with the connection's error;
	// then at once, saying why.
	var last error
	var fast time.Duration
	for i := range 20 {
		t0 := time.Now()
		err := pub.Publish(ctx, "chat:x", env)
		if err == nil {
			t.Fatalf("publish %d succeeded with Redis down", i)
		}
		if !errors.Is(err, fabric.ErrBackendUnavailable) {
			t.Fatalf("publish %d: %v does not wrap ErrBackendUnavailable", i, err)
		}
		if errors.Is(err, breaker.ErrOpen) {
			fast = max(fast, time.Since(t0))
		}
		last = err
	}
	if !errors.Is(last, breaker.ErrOpen) || !strings.Contains(last.Error(), "circuit breaker open") {
		t.Fatalf("after 20 failed publishes: %v; want the breaker open", last)
	}
	if fast > 10*time.Millisecond {
		t.Fatalf("a publish refused by the open breaker took %s", fast)
	}
	t.Logf("with Redis down: %v", last)
	if _, err := a.History().Append(ctx, "feed:x", env, ""); !errors.Is(err, fabric.ErrBackendUnavailable) {
		t.Fatalf("append with Redis down: %v", err)
	}

	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	// The breaker lets a probe through after its reset timeout; the pub/sub
	// connections come back with backoff and resubscribe.
	fabrictest.WaitFor(t, 20*time.Second, "deliveries to resume", func() bool {
		before := plain.got.Load()
		if pub.Publish(ctx, "chat:x", env) != nil {
			return false
		}
		deadline := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(deadline) {
			if plain.got.Load() > before {
				return true
			}
			time.Sleep(5 * time.Millisecond)
		}
		return false
	})
	if b.Reconnects() < 1 {
		t.Fatalf("the subscriber's pub/sub connection reconnected %d times", b.Reconnects())
	}
	pos2, err := a.History().Append(ctx, "feed:x", fabric.Envelope("feed:x", "m", []byte(`2`)), "")
	if err != nil {
		t.Fatal(err)
	}
	if pos2.Epoch == pos.Epoch || pos2.Seq != 1 {
		t.Fatalf("after a restart without persistence: %+v (before %+v); want a new epoch from seq 1", pos2, pos)
	}
	fabrictest.WaitFor(t, 10*time.Second, "the stored message after the restart", func() bool { return stored.last.Load() == 1 })
	rng, err := b.History().Since(ctx, "feed:x", pos.Seq, 0)
	if err != nil || rng.Epoch != pos2.Epoch {
		t.Fatalf("Since after the restart: %+v, %v; want the new epoch", rng, err)
	}
}

// TestRedisRestartAOF: with appendonly yes and appendfsync always, every
// acknowledged append survives Redis being killed: same epoch, same
// messages, and the next append continues the sequence.
func TestRedisRestartAOF(t *testing.T) {
	p := startRedis(t, "--appendonly", "yes", "--appendfsync", "always")
	prefix := fabrictest.TestPrefix(t)
	a := newBackend(t, redis.Options{URL: p.url(), Prefix: prefix, Timeout: time.Second})
	ctx := context.Background()
	var acked []uint64
	var epoch string
	for i := range 50 {
		pos, err := a.History().Append(ctx, "feed:aof", fabric.Envelope("feed:aof", "m", fmt.Appendf(nil, "%d", i)), "")
		if err != nil {
			t.Fatal(err)
		}
		acked, epoch = append(acked, pos.Seq), pos.Epoch
	}
	p.kill()
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	var rng fabric.Range
	fabrictest.WaitFor(t, 20*time.Second, "the history to be readable again", func() bool {
		var err error
		rng, err = a.History().Since(ctx, "feed:aof", 0, 0)
		return err == nil
	})
	if rng.Epoch != epoch || !slices.Equal(seqsOf(rng), acked) {
		t.Fatalf("after the restart: epoch %s (was %s), seqs %v; want every acknowledged one %v", rng.Epoch, epoch, seqsOf(rng), acked)
	}
	// With a message id the append is idempotent, so it is retried when
	// it meets one of the client's connections closed by the restart.
	pos, err := a.History().Append(ctx, "feed:aof", fabric.Envelope("feed:aof", "m", []byte(`"next"`)), "next")
	if err != nil || pos.Epoch != epoch || pos.Seq != acked[len(acked)-1]+1 {
		t.Fatalf("next append: %+v, %v; want seq %d in %s", pos, err, acked[len(acked)-1]+1, epoch)
	}
}

func seqsOf(r fabric.Range) []uint64 {
	out := make([]uint64, len(r.Messages))
	for i, m := range r.Messages {
		out[i] = m.Seq
	}
	return out
}
