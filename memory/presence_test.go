package memory_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
)

// watchLog is a PresenceWatcher that logs every call.
type watchLog struct {
	mu  sync.Mutex
	log []string
}

func (w *watchLog) PresenceReset(entries []fabric.PresenceEntry) {
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Topic+"/"+e.Key+"/"+e.Instance+"="+string(e.Data))
	}
	w.add("reset " + strings.Join(ids, ","))
}

func (w *watchLog) PresencePut(e fabric.PresenceEntry) {
	if e.ID != memory.PresenceID(e.Topic, e.Key, e.Instance) {
		w.add("bad id " + e.ID)
	}
	w.add("put " + e.Topic + "/" + e.Key + "/" + e.Instance + "=" + string(e.Data))
}

func (w *watchLog) PresenceRemoved(id string) { w.add("removed " + id) }

func (w *watchLog) add(s string) {
	w.mu.Lock()
	w.log = append(w.log, s)
	w.mu.Unlock()
}

func (w *watchLog) lines() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.Join(w.log, "\n")
}

func entry(topic, key, inst, data string) fabric.PresenceEntry {
	return fabric.PresenceEntry{Topic: topic, Key: key, Instance: inst, Data: json.RawMessage(data)}
}

func TestPresenceWatch(t *testing.T) {
	b := newBackend(t, memory.Options{})
	s := b.PresenceStore()
	ctx := ctxT(t)
	if err := s.Put(entry("room:1", "alice", "n1", `{"n":"A"}`), time.Hour).Wait(ctx); err != nil {
		t.Fatal(err)
	}
	s.Put(entry("room:1", "bob", "n2", ``), time.Hour)
	w := &watchLog{}
	stop, err := s.Watch(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if got := w.lines(); got != `reset room:1/alice/n1={"n":"A"},room:1/bob/n2=null` {
		t.Fatalf("reset: %s", got)
	}
	s.Put(entry("room:1", "alice", "n1", `{"n":"A"}`), time.Hour)  // refresh: not reported
	s.Put(entry("room:1", "alice", "n1", `{"n":"A2"}`), time.Hour) // new data: reported
	s.Remove("room:1", "bob", "n2")
	s.Remove("room:1", "bob", "n2") // missing: nothing
	if err := s.Put(entry("room:1", "carol", "n1", `1`), 0).Wait(ctx); err == nil {
		t.Fatal("a zero ttl was accepted")
	}
	want := `reset room:1/alice/n1={"n":"A"},room:1/bob/n2=null
put room:1/alice/n1={"n":"A2"}
removed ` + memory.PresenceID("room:1", "bob", "n2")
	if got := w.lines(); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	// IDs never collide, whatever the parts hold.
	if memory.PresenceID("a", "b\x00c", "d") == memory.PresenceID("a", "b", "\x00cd") ||
		memory.PresenceID("ab", "", "c") == memory.PresenceID("a", "b", "c") {
		t.Fatal("PresenceID collides")
	}
}

func TestPresenceExpiryReachesWatchers(t *testing.T) {
	b := newBackend(t, memory.Options{})
	s := b.PresenceStore()
	ctx := ctxT(t)
	w := &watchLog{}
	stop, err := s.Watch(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	start := time.Now()
	s.Put(entry("room:1", "alice", "n1", `1`), 40*time.Millisecond)
	s.Put(entry("room:1", "bob", "n1", `1`), time.Hour)
	// A refresh with a shorter ttl moves the expiry forward.
	s.Put(entry("room:1", "bob", "n1", `1`), 60*time.Millisecond)
	aliceGone := "removed " + memory.PresenceID("room:1", "alice", "n1")
	bobGone := "removed " + memory.PresenceID("room:1", "bob", "n1")
	waitFor(t, "both entries to expire", func() bool {
		l := w.lines()
		return strings.Contains(l, aliceGone) && strings.Contains(l, bobGone)
	})
	if el := time.Since(start); el < 60*time.Millisecond {
		t.Fatalf("entries expired after %v, before their ttl", el)
	}
	if l := w.lines(); strings.Index(l, aliceGone) > strings.Index(l, bobGone) {
		t.Fatalf("expiries out of order:\n%s", l)
	}
	if n := s.Len(); n != 0 {
		t.Fatalf("%d entries left", n)
	}
}

func TestPresenceRefreshKeepsEntry(t *testing.T) {
	b := newBackend(t, memory.Options{})
	s := b.PresenceStore()
	w := &watchLog{}
	stop, err := s.Watch(ctxT(t), w)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	s.Put(entry("room:1", "alice", "n1", `1`), 30*time.Millisecond)
	s.Put(entry("room:1", "alice", "n1", `1`), time.Hour) // the refresh
	// The marker expires after alice's first deadline: once it is gone,
	// the expiry has gone past that deadline.
	s.Put(entry("room:1", "marker", "n1", `1`), 60*time.Millisecond)
	waitFor(t, "the marker to expire", func() bool {
		return strings.Contains(w.lines(), "removed "+memory.PresenceID("room:1", "marker", "n1"))
	})
	if strings.Contains(w.lines(), memory.PresenceID("room:1", "alice", "n1")) {
		t.Fatalf("a refreshed entry expired:\n%s", w.lines())
	}
}

// blockingWatcher blocks in PresencePut until released.
type blockingWatcher struct {
	entered chan struct{}
	release chan struct{}
	done    atomic.Bool
	calls   atomic.Int32
}

func (w *blockingWatcher) PresenceReset([]fabric.PresenceEntry) {}
func (w *blockingWatcher) PresenceRemoved(string)               {}
func (w *blockingWatcher) PresencePut(fabric.PresenceEntry) {
	if w.calls.Add(1) == 1 {
		close(w.entered)
		<-w.release
		w.done.Store(true)
	}
}

func TestWatcherStopWaitsForTheCallInProgress(t *testing.T) {
	b := newBackend(t, memory.Options{})
	s := b.PresenceStore()
	w := &blockingWatcher{entered: make(chan struct{}), release: make(chan struct{})}
	stop, err := s.Watch(ctxT(t), w)
	if err != nil {
		t.Fatal(err)
	}
	go s.Put(entry("room:1", "alice", "n1", `1`), time.Hour)
	<-w.entered
	stopped := make(chan bool)
	go func() {
		stop()
		stopped <- w.done.Load()
	}()
	select {
	case <-stopped:
		t.Fatal("stop returned while the watcher was inside PresencePut")
	case <-time.After(20 * time.Millisecond): // give stop a chance to (wrongly) return
	}
	close(w.release)
	if !<-stopped {
		t.Fatal("stop returned before the call in progress ended")
	}
	stop() // idempotent
	s.Put(entry("room:1", "bob", "n1", `1`), time.Hour)
	if n := w.calls.Load(); n != 1 {
		t.Fatalf("watcher called %d times, want 1 (none after stop)", n)
	}
}

func TestPresenceTotalOrder(t *testing.T) {
	b := newBackend(t, memory.Options{})
	s := b.PresenceStore()
	ws := []*watchLog{{}, {}}
	for _, w := range ws {
		stop, err := s.Watch(ctxT(t), w)
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				key := fmt.Sprintf("u%d", i%5)
				s.Put(entry("room:1", key, fmt.Sprint(g), fmt.Sprint(i)), time.Hour)
				if i%3 == 0 {
					s.Remove("room:1", key, fmt.Sprint(g))
				}
			}
		})
	}
	wg.Wait()
	if ws[0].lines() != ws[1].lines() {
		t.Fatal("two watchers saw different orders")
	}
}

func TestPresenceBound(t *testing.T) {
	b := newBackend(t, memory.Options{MaxPresence: 2})
	s := b.PresenceStore()
	ctx := ctxT(t)
	for i := range 2 {
		if err := s.Put(entry("t", fmt.Sprint(i), "n", `1`), time.Hour).Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Put(entry("t", "2", "n", `1`), time.Hour).Wait(ctx); err == nil {
		t.Fatal("a third entry was accepted past MaxPresence")
	}
	if err := s.Put(entry("t", "1", "n", `2`), time.Hour).Wait(ctx); err != nil {
		t.Fatalf("refreshing an entry at the bound: %v", err)
	}
}
