package redis_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
)

// recWatcher records what a presence watch tells it.
type recWatcher struct {
	mu      sync.Mutex
	resets  int
	entries map[string]fabric.PresenceEntry
	log     []string
}

func newRecWatcher() *recWatcher { return &recWatcher{entries: map[string]fabric.PresenceEntry{}} }

func (w *recWatcher) PresenceReset(es []fabric.PresenceEntry) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.resets++
	clear(w.entries)
	for _, e := range es {
		w.entries[e.ID] = e
	}
	w.log = append(w.log, "reset")
}

func (w *recWatcher) PresencePut(e fabric.PresenceEntry) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.entries[e.ID] = e
	w.log = append(w.log, "put:"+e.Key+"="+string(e.Data))
}

func (w *recWatcher) PresenceRemoved(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if e, ok := w.entries[id]; ok {
		w.log = append(w.log, "removed:"+e.Key)
	} else {
		w.log = append(w.log, "removed:?")
	}
	delete(w.entries, id)
}

func (w *recWatcher) has(id string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, ok := w.entries[id]
	return ok
}

func (w *recWatcher) keys() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, e := range w.entries {
		out = append(out, e.Key)
	}
	slices.Sort(out)
	return out
}

func (w *recWatcher) events(key string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, l := range w.log {
		if strings.HasPrefix(l, "put:"+key+"=") || l == "removed:"+key {
			out = append(out, l)
		}
	}
	return out
}

func watch(t *testing.T, s fabric.PresenceStore) *recWatcher {
	t.Helper()
	w := newRecWatcher()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stop, err := s.Watch(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return w
}

// TestPresenceEntryOrder: the changes of one entry (writes, a refresh that
// changes nothing, its expiry, a later put) reach every watcher of every
// instance in the order they took effect, the expiry as a removal; Wait
// returns once this instance's watchers have applied the write.
func TestPresenceEntryOrder(t *testing.T) {
	url := needRedis(t)
	prefix := fabrictest.TestPrefix(t)
	t.Cleanup(func() { dropPrefix(t, url, prefix, ":*") })
	a := newBackend(t, redis.Options{URL: url, Prefix: prefix, PresenceSweep: 50 * time.Millisecond})
	b := newBackend(t, redis.Options{URL: url, Prefix: prefix, PresenceSweep: 50 * time.Millisecond})
	wa, wb := watch(t, a.PresenceStore()), watch(t, b.PresenceStore())
	ctx := context.Background()
	put := func(data string, ttl time.Duration) {
		t.Helper()
		e := fabric.PresenceEntry{Topic: "room:1", Key: "ann", Instance: "i1", Data: json.RawMessage(data)}
		if err := a.PresenceStore().Put(e, ttl).Wait(ctx); err != nil {
			t.Fatal(err)
		}
		if !wa.has(redis.PresenceID("room:1", "ann", "i1")) {
			t.Fatal("Wait returned before this instance's watcher had the entry")
		}
	}
	put(`1`, time.Minute)
	put(`1`, time.Minute) // a refresh: not reported
	put(`2`, 200*time.Millisecond)
	want := []string{"put:ann=1", "put:ann=2", "removed:ann"}
	for name, w := range map[string]*recWatcher{"a": wa, "b": wb} {
		fabrictest.WaitFor(t, 5*time.Second, "the expiry on "+name, func() bool { return len(w.events("ann")) == 3 })
		if got := w.events("ann"); !slices.Equal(got, want) {
			t.Fatalf("watcher %s saw %v, want %v", name, got, want)
		}
	}
	put(`3`, time.Minute)
	if err := b.PresenceStore().Remove("room:1", "ann", "i1").Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.PresenceStore().Remove("room:1", "ann", "i1").Wait(ctx); err != nil { // nothing to remove
		t.Fatal(err)
	}
	want = append(want, "put:ann=3", "removed:ann")
	for name, w := range map[string]*recWatcher{"a": wa, "b": wb} {
		fabrictest.WaitFor(t, 5*time.Second, "the removal on "+name, func() bool { return len(w.events("ann")) == 5 })
		if got := w.events("ann"); !slices.Equal(got, want) {
			t.Fatalf("watcher %s saw %v, want %v", name, got, want)
		}
	}
}

// TestPresenceReload: a watcher whose pub/sub connection is cut while
// entries change reloads (a Reset) and ends up with exactly the store's
// entries.
func TestPresenceReload(t *testing.T) {
	p := startRedis(t)
	prefix := fabrictest.TestPrefix(t)
	a := newBackend(t, redis.Options{URL: p.url(), Prefix: prefix})
	b := newBackend(t, redis.Options{URL: p.url(), Prefix: prefix})
	w := watch(t, a.PresenceStore())
	ctx := context.Background()
	c := rawClient(t, p.url())
	want := map[string]bool{}
	for i := range 200 {
		key := fmt.Sprintf("u%03d", i)
		if i%50 == 25 {
			if err := c.Do(ctx, c.B().ClientKill().TypePubsub().Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
		_ = b.PresenceStore().Put(fabric.PresenceEntry{Topic: fmt.Sprintf("room:%d", i%7), Key: key, Instance: "b"}, time.Minute)
		want[key] = true
		if i%3 == 0 {
			_ = b.PresenceStore().Remove(fmt.Sprintf("room:%d", i%7), key, "b")
			delete(want, key)
		}
	}
	keys := slices.Sorted(maps.Keys(want))
	fabrictest.WaitFor(t, 10*time.Second, "the watcher to converge", func() bool { return slices.Equal(w.keys(), keys) })
	w.mu.Lock()
	resets := w.resets
	w.mu.Unlock()
	if resets < 2 {
		t.Fatalf("%d resets, want a reload after the cut", resets)
	}
	if a.Reconnects() < 1 {
		t.Fatalf("%d reconnections", a.Reconnects())
	}
}
