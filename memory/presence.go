package memory

import (
	"bytes"
	"cmp"
	"container/heap"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// PresenceStore is fabric.PresenceStore on a Backend.
//
// Put and Remove take effect at once, under the store's lock, and call
// every watcher (PresencePut, PresenceRemoved) before they return, still
// under that lock: every watcher sees all changes in one total order, and
// the PresenceWrite they return is already done. A watcher must therefore
// not write to the store, nor call its own stop function, from inside its
// methods: that deadlocks.
//
// A Put of an entry that exists with the same Data only pushes its expiry
// back and is not reported; a Put that changes Data is reported as a
// PresencePut. Entries that are not refreshed are removed by a timer when
// their ttl has passed, and reported as PresenceRemoved.
type PresenceStore struct {
	b *Backend

	mu       sync.Mutex
	entries  map[string]*pentry
	expiry   pheap
	watchers []*pwatch
	kick     chan struct{} // wakes run when the earliest expiry moved up
}

type pentry struct {
	e   fabric.PresenceEntry
	exp int64 // Backend.now() at which the entry expires
	idx int   // index in the expiry heap
}

type pwatch struct{ w fabric.PresenceWatcher }

func newPresenceStore(b *Backend) *PresenceStore {
	return &PresenceStore{b: b, entries: map[string]*pentry{}, kick: make(chan struct{}, 1)}
}

// PresenceStore returns the backend's presence store (the same for every
// call).
func (b *Backend) PresenceStore() *PresenceStore { return b.presence }

// PresenceID returns the ID of the entry of topic, user key and instance:
// the three lengths and strings, so that no two triples share an ID.
func PresenceID(topic, key, instance string) string {
	var sb strings.Builder
	sb.Grow(len(topic) + len(key) + len(instance) + 8)
	sb.WriteString(strconv.Itoa(len(topic)))
	sb.WriteByte(':')
	sb.WriteString(topic)
	sb.WriteString(strconv.Itoa(len(key)))
	sb.WriteByte(':')
	sb.WriteString(key)
	sb.WriteString(instance)
	return sb.String()
}

// presenceWrite is a write that is already done (or refused).
type presenceWrite struct{ err error }

// Wait implements fabric.PresenceWrite: the write took effect (and every
// watcher was told) before Put or Remove returned, so Wait returns its
// outcome at once, whether or not ctx is done: nil, or why the write was
// refused.
func (w presenceWrite) Wait(context.Context) error { return w.err }

func (s *PresenceStore) failed(err error) fabric.PresenceWrite {
	s.b.log.Warn("memory: presence write failed", "err", err)
	return presenceWrite{err}
}

// Put implements fabric.PresenceStore. ttl must be positive. Data is
// copied; empty Data is stored as null.
func (s *PresenceStore) Put(e fabric.PresenceEntry, ttl time.Duration) fabric.PresenceWrite {
	if ttl <= 0 {
		return s.failed(fmt.Errorf("memory: presence put %q: ttl %v is not positive", clip(e.Topic), ttl))
	}
	e.ID = PresenceID(e.Topic, e.Key, e.Instance)
	if len(e.Data) == 0 {
		e.Data = json.RawMessage("null")
	} else {
		e.Data = bytes.Clone(e.Data)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.closed.Load() {
		return s.failed(fmt.Errorf("memory: presence put %q: %w", clip(e.Topic), ErrClosed))
	}
	exp := s.b.now() + int64(ttl)
	pe := s.entries[e.ID]
	if pe == nil {
		if len(s.entries) >= s.b.opts.MaxPresence {
			return s.failed(fmt.Errorf("memory: presence put %q: the store holds its maximum of %d entries", clip(e.Topic), s.b.opts.MaxPresence))
		}
		pe = &pentry{e: e, exp: exp}
		s.entries[e.ID] = pe
		heap.Push(&s.expiry, pe)
		s.report(func(w fabric.PresenceWatcher) { w.PresencePut(e) })
	} else {
		changed := !bytes.Equal(pe.e.Data, e.Data)
		pe.e, pe.exp = e, exp
		heap.Fix(&s.expiry, pe.idx)
		if changed {
			s.report(func(w fabric.PresenceWatcher) { w.PresencePut(e) })
		}
	}
	if pe.idx == 0 {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	return presenceWrite{}
}

// Remove implements fabric.PresenceStore; removing an entry that does not
// exist does nothing.
func (s *PresenceStore) Remove(topic, key, instance string) fabric.PresenceWrite {
	id := PresenceID(topic, key, instance)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.closed.Load() {
		return s.failed(fmt.Errorf("memory: presence remove %q: %w", clip(topic), ErrClosed))
	}
	if pe := s.entries[id]; pe != nil {
		s.removeLocked(pe)
	}
	return presenceWrite{}
}

func (s *PresenceStore) removeLocked(pe *pentry) {
	delete(s.entries, pe.e.ID)
	heap.Remove(&s.expiry, pe.idx)
	id := pe.e.ID
	s.report(func(w fabric.PresenceWatcher) { w.PresenceRemoved(id) })
}

// report calls fn for every watcher. s.mu is held.
func (s *PresenceStore) report(fn func(fabric.PresenceWatcher)) {
	for _, pw := range s.watchers {
		fn(pw.w)
	}
}

// Watch implements fabric.PresenceStore: w gets a PresenceReset with every
// current entry (ordered by topic, key, instance) before Watch returns,
// then every change. stop unregisters w; once it returns no call to w is
// under way and none will come. It must not be called from inside w's
// methods.
func (s *PresenceStore) Watch(ctx context.Context, w fabric.PresenceWatcher) (func(), error) {
	if w == nil {
		return nil, errors.New("memory: presence watch: nil watcher")
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("memory: presence watch: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.closed.Load() {
		return nil, fmt.Errorf("memory: presence watch: %w", ErrClosed)
	}
	entries := make([]fabric.PresenceEntry, 0, len(s.entries))
	for _, pe := range s.entries {
		entries = append(entries, pe.e)
	}
	slices.SortFunc(entries, func(a, b fabric.PresenceEntry) int {
		return cmp.Or(strings.Compare(a.Topic, b.Topic), strings.Compare(a.Key, b.Key), strings.Compare(a.Instance, b.Instance))
	})
	w.PresenceReset(entries)
	pw := &pwatch{w: w}
	s.watchers = append(s.watchers, pw)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if i := slices.Index(s.watchers, pw); i >= 0 {
				s.watchers = slices.Delete(s.watchers, i, i+1)
			}
			s.mu.Unlock()
		})
	}, nil
}

// Len returns the number of entries stored.
func (s *PresenceStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// run removes entries as they expire, until the backend closes.
func (s *PresenceStore) run() {
	defer s.b.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		now := s.b.now()
		for len(s.expiry) > 0 && s.expiry[0].exp <= now {
			s.removeLocked(s.expiry[0])
		}
		wait := time.Duration(-1)
		if len(s.expiry) > 0 {
			wait = time.Duration(s.expiry[0].exp - now)
		}
		s.mu.Unlock()
		var fire <-chan time.Time
		if wait >= 0 {
			timer.Reset(wait)
			fire = timer.C
		}
		select {
		case <-s.b.done:
			return
		case <-s.kick:
		case <-fire:
		}
	}
}

// pheap orders entries by expiry (container/heap).
type pheap []*pentry

func (h pheap) Len() int           { return len(h) }
func (h pheap) Less(i, j int) bool { return h[i].exp < h[j].exp }
func (h pheap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].idx, h[j].idx = i, j
}
func (h *pheap) Push(x any) {
	pe := x.(*pentry)
	pe.idx = len(*h)
	*h = append(*h, pe)
}
func (h *pheap) Pop() any {
	old := *h
	pe := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	pe.idx = -1
	return pe
}

var (
	_ fabric.PresenceStore = (*PresenceStore)(nil)
	_ fabric.PresenceWrite = presenceWrite{}
)
