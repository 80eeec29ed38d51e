package jetstream_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	natsjs "github.com/nats-io/nats.go/jetstream"
)

// leaseStores starts an instance and returns two lease stores on it, each
// on its own NATS connection (as two instances of a cluster would be).
func leaseStores(t *testing.T) (inst *fabrictest.Instance, a, b *jetstream.LeaseStore, closeB func()) {
	t.Helper()
	inst = fabrictest.NewInstance(t, fabrictest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	if a, err = jetstream.NewLeaseStore(ctx, inst.JS, jetstream.LeaseOptions{Prefix: inst.Broker.Prefix()}); err != nil {
		t.Fatal(err)
	}
	nc2, err := inst.Server.Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc2.Close)
	js2, err := natsjs.New(nc2)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = jetstream.NewLeaseStore(ctx, js2, jetstream.LeaseOptions{Prefix: inst.Broker.Prefix()}); err != nil {
		t.Fatal(err)
	}
	return inst, a, b, nc2.Close
}

func acquire(t *testing.T, s *jetstream.LeaseStore, name, holder string, ttl time.Duration) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ok, err := s.Acquire(ctx, name, holder, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func release(t *testing.T, s *jetstream.LeaseStore, name, holder string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Release(ctx, name, holder); err != nil {
		t.Fatal(err)
	}
}

func TestLeaseStore(t *testing.T) {
	inst, a, b, closeB := leaseStores(t)

	t.Run("Exclusive", func(t *testing.T) {
		if !acquire(t, a, "pg:orders", "a", time.Minute) {
			t.Fatal("a could not take a free lease")
		}
		if acquire(t, b, "pg:orders", "b", time.Minute) {
			t.Fatal("b took a lease a holds")
		}
		if !acquire(t, a, "pg:orders", "a", time.Minute) {
			t.Fatal("a could not refresh its lease")
		}
		if !acquire(t, b, "pg:orders", "a", time.Minute) {
			t.Fatal("the same holder through another store was refused")
		}
		if acquire(t, b, "pg:orders", "b", time.Minute) {
			t.Fatal("b took a lease a refreshed")
		}
		ctx := context.Background()
		if _, err := a.Acquire(ctx, "pg:orders", "a", 0); err == nil {
			t.Fatal("a zero ttl was accepted")
		}
		if _, err := a.Acquire(ctx, "pg:orders", "", time.Second); err == nil {
			t.Fatal("an empty holder was accepted")
		}
	})

	t.Run("Release", func(t *testing.T) {
		const name = "pg:release / any name ✓"
		if !acquire(t, a, name, "a", time.Minute) {
			t.Fatal("a could not take a free lease")
		}
		release(t, b, name, "b") // not b's: nothing happens
		if acquire(t, b, name, "b", time.Minute) {
			t.Fatal("a release by another holder freed the lease")
		}
		release(t, a, name, "a")
		if !acquire(t, b, name, "b", time.Minute) {
			t.Fatal("b could not take a released lease")
		}
		if acquire(t, a, name, "a", time.Minute) {
			t.Fatal("a took b's lease back")
		}
		release(t, b, name, "b")
		release(t, b, name, "b") // twice: nothing to do
		if !acquire(t, a, name, "a", time.Minute) {
			t.Fatal("a could not take the lease again")
		}
	})

	t.Run("Race", func(t *testing.T) {
		for round := range 5 {
			name := fmt.Sprintf("pg:race-%d", round)
			if round%2 == 1 { // race on a release marker rather than on nothing
				if !acquire(t, a, name, "first", time.Minute) {
					t.Fatal("could not take a free lease")
				}
				release(t, a, name, "first")
			}
			var wins atomic.Int32
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := range 8 {
				s := a
				if i%2 == 1 {
					s = b
				}
				wg.Go(func() {
					<-start
					ok, err := s.Acquire(context.Background(), name, fmt.Sprintf("holder-%d", i), time.Minute)
					if err != nil {
						t.Error(err)
					}
					if ok {
						wins.Add(1)
					}
				})
			}
			close(start)
			wg.Wait()
			if n := wins.Load(); n != 1 {
				t.Fatalf("round %d: %d holders won the lease, want exactly 1", round, n)
			}
		}
	})

	t.Run("PrefixIsolation", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		other, err := jetstream.NewLeaseStore(ctx, inst.JS, jetstream.LeaseOptions{Prefix: fabrictest.TestPrefix(t)})
		if err != nil {
			t.Fatal(err)
		}
		if other.Bucket() == a.Bucket() {
			t.Fatalf("two prefixes share the bucket %s", a.Bucket())
		}
		if !acquire(t, a, "pg:iso", "a", time.Minute) || !acquire(t, other, "pg:iso", "other", time.Minute) {
			t.Fatal("a lease under one prefix blocked the same name under another")
		}
	})

	t.Run("Expiry", func(t *testing.T) {
		const name, ttl = "pg:expiry", time.Second
		if !acquire(t, a, name, "a", ttl) {
			t.Fatal("a could not take a free lease")
		}
		// a refreshes well within its ttl for longer than the ttl: b never
		// gets the lease (a refresh that dropped the TTL would show below,
		// as a lease that never expires).
		refresh := time.NewTicker(300 * time.Millisecond)
		defer refresh.Stop()
		var last time.Time
		for until := time.Now().Add(ttl + 600*time.Millisecond); time.Now().Before(until); {
			<-refresh.C
			if !acquire(t, a, name, "a", ttl) {
				t.Fatal("a lost its lease while refreshing it")
			}
			last = time.Now()
			if acquire(t, b, name, "b", ttl) {
				t.Fatal("b took a lease a keeps refreshing")
			}
		}
		// a stops: b gets the lease once the ttl has passed.
		for !acquire(t, b, name, "b", ttl) {
			if time.Since(last) > ttl+time.Second {
				t.Fatalf("b still cannot take the lease %v after a's last refresh (ttl %v)", time.Since(last), ttl)
			}
			time.Sleep(50 * time.Millisecond) // polling pace
		}
		if el := time.Since(last); el < ttl-200*time.Millisecond {
			t.Fatalf("the lease expired %v after the last refresh, before its ttl %v", el, ttl)
		} else {
			t.Logf("taken over %v after the last refresh (ttl %v)", el, ttl)
		}
		if acquire(t, a, name, "a", ttl) {
			t.Fatal("a took the lease back from b")
		}
	})

	t.Run("Unavailable", func(t *testing.T) {
		closeB()
		_, err := b.Acquire(context.Background(), "pg:orders", "b", time.Second)
		if !errors.Is(err, fabric.ErrBackendUnavailable) {
			t.Fatalf("acquire on a closed connection: %v, want ErrBackendUnavailable", err)
		}
		if err := b.Release(context.Background(), "pg:orders", "b"); !errors.Is(err, fabric.ErrBackendUnavailable) {
			t.Fatalf("release on a closed connection: %v, want ErrBackendUnavailable", err)
		}
	})
}
