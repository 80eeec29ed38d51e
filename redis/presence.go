package redis

import (
	"bytes"
	"cmp"
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
	"github.com/redis/rueidis"
)

// Bounds of the presence store.
const (
	// presenceQueue bounds the writes waiting to be sent; a write past it
	// fails at once.
	presenceQueue = 1 << 16
	// presenceBatch is the most writes sent in one pipeline.
	presenceBatch = 256
	// sweepLimit is the most expired entries one sweep script removes.
	sweepLimit = 256
	// watchQueue bounds the changes waiting for one watcher; past it the
	// watcher reloads.
	watchQueue = 1 << 16
)

// PresenceStore is fabric.PresenceStore on Redis. Each partition P (of the
// entry's topic) has a sorted set of expiries ("<prefix>:{P}:pz", score =
// expiry in server ms), a hash of entries ("<prefix>:{P}:ph", the entry's
// ID → {"t","k","i","d"}), a version hash ("<prefix>:{P}:pv": an
// incarnation id and a counter) and a change channel ("<prefix>:{P}:pc").
//
// Every write is one script (presenceScript) that changes the entry and,
// when it changed what watchers know, takes the partition's next version
// and publishes the change with it, atomically. Expiry is a sweep
// (sweepScript) that every store runs every PresenceSweep: it removes the
// entries whose expiry has passed and publishes each removal the same way.
// So the changes of one entry, whether writes or its expiry, take effect
// in one order on one Redis node and are published on one channel in that
// order, each with the next version of the partition: every watcher sees
// them in the order they took effect, and a watcher that missed one (a
// broken pub/sub connection, its own queue overflowing) sees the gap and
// reloads (a PresenceReset). Keyspace notifications are not used: they
// are off by default and lossy.
//
// Put and Remove queue the write; one goroutine sends the queue in
// pipelines (so one caller's writes take effect in call order). A refresh
// that changes nothing is not reported to watchers. An entry expires at
// most PresenceSweep after its ttl.
type PresenceStore struct {
	b     *Backend
	queue chan *presenceWrite

	mu      sync.Mutex
	watches map[*presenceWatch]struct{}

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// presenceValue is the JSON stored for an entry.
type presenceValue struct {
	Topic    string          `json:"t"`
	Key      string          `json:"k"`
	Instance string          `json:"i"`
	Data     json.RawMessage `json:"d"`
}

// PresenceStore returns the backend's presence store (the same for every
// call), starting its writer and sweeper on the first call.
func (b *Backend) PresenceStore() *PresenceStore {
	b.presOnce.Do(func() {
		s := &PresenceStore{b: b, queue: make(chan *presenceWrite, presenceQueue),
			watches: map[*presenceWatch]struct{}{}, stop: make(chan struct{})}
		b.mu.Lock()
		b.presence = s
		closing := b.closing
		b.mu.Unlock()
		if closing {
			close(s.stop)
			return
		}
		s.wg.Add(2)
		go s.writer()
		go s.sweeper()
	})
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.presence
}

// PresenceID returns the ID of the entry of topic, user key and instance:
// the lengths and the strings, so that no two triples share an ID.
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

// keys returns the presence keys of partition p: expiries, entries,
// versions, and the change channel.
func (s *PresenceStore) keys(p int) (zset, hash, ver, channel string) {
	b := s.b
	return b.key(p, "pz", ""), b.key(p, "ph", ""), b.key(p, "pv", ""), b.key(p, "pc", "")
}

// presenceWrite is one queued write and, once sent, its outcome.
type presenceWrite struct {
	s     *PresenceStore
	part  int
	op    string
	id    string
	value string
	ttl   time.Duration
	what  string

	done    chan struct{}
	ok      bool
	err     error
	inc     string
	version int64
}

// Put implements fabric.PresenceStore. ttl must be positive; Data empty is
// stored as null.
func (s *PresenceStore) Put(e fabric.PresenceEntry, ttl time.Duration) fabric.PresenceWrite {
	if ttl <= 0 {
		return s.failed(fmt.Errorf("redis: presence put %q: ttl %v is not positive", clip(e.Topic), ttl))
	}
	data := e.Data
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	v, err := json.Marshal(presenceValue{Topic: e.Topic, Key: e.Key, Instance: e.Instance, Data: data})
	if err != nil {
		return s.failed(fmt.Errorf("redis: presence put %q: %w", clip(e.Topic), err))
	}
	return s.enqueue(&presenceWrite{s: s, part: s.b.partition(e.Topic), op: "put",
		id: PresenceID(e.Topic, e.Key, e.Instance), value: string(v), ttl: ttl, what: "presence put"})
}

// Remove implements fabric.PresenceStore; removing an entry that does not
// exist does nothing.
func (s *PresenceStore) Remove(topic, key, instance string) fabric.PresenceWrite {
	return s.enqueue(&presenceWrite{s: s, part: s.b.partition(topic), op: "del",
		id: PresenceID(topic, key, instance), what: "presence remove"})
}

func (s *PresenceStore) enqueue(w *presenceWrite) fabric.PresenceWrite {
	w.done = make(chan struct{})
	select {
	case <-s.stop:
		return s.failed(fmt.Errorf("redis: %s: %w", w.what, ErrClosed))
	default:
	}
	select {
	case s.queue <- w:
		return w
	default:
		return s.failed(fmt.Errorf("redis: %s: %w: %d writes already waiting", w.what, fabric.ErrBackendUnavailable, presenceQueue))
	}
}

func (s *PresenceStore) failed(err error) fabric.PresenceWrite {
	s.b.logFailure("redis: presence write failed", err)
	return failedWrite{err}
}

// failedWrite is a write that was never sent.
type failedWrite struct{ err error }

// Wait implements fabric.PresenceWrite.
func (f failedWrite) Wait(context.Context) error { return f.err }

// Wait implements fabric.PresenceWrite: the write's outcome, then every
// watcher of this store having applied it.
func (w *presenceWrite) Wait(ctx context.Context) error {
	select {
	case <-w.done:
	case <-ctx.Done():
		return fmt.Errorf("redis: %s: %w", w.what, ctx.Err())
	}
	if w.err != nil {
		return w.err
	}
	w.s.mu.Lock()
	watches := make([]*presenceWatch, 0, len(w.s.watches))
	for pw := range w.s.watches {
		watches = append(watches, pw)
	}
	w.s.mu.Unlock()
	for _, pw := range watches {
		if err := pw.waitApplied(ctx, w.part, w.inc, w.version); err != nil {
			return fmt.Errorf("redis: %s: waiting for the watcher: %w", w.what, err)
		}
	}
	return nil
}

// writer sends queued writes in pipelines until the store closes.
func (s *PresenceStore) writer() {
	defer s.wg.Done()
	batch := make([]*presenceWrite, 0, presenceBatch)
	for {
		select {
		case <-s.stop:
			s.failQueued()
			return
		case w := <-s.queue:
			batch = append(batch[:0], w)
		}
	more:
		for len(batch) < presenceBatch {
			select {
			case w := <-s.queue:
				batch = append(batch, w)
			default:
				break more
			}
		}
		s.send(batch)
		clear(batch)
	}
}

// send runs a batch of writes in one pipeline.
func (s *PresenceStore) send(batch []*presenceWrite) {
	b := s.b
	candidate := b.newEpoch()
	execs := make([]rueidis.LuaExec, len(batch))
	for i, w := range batch {
		zset, hash, ver, ch := s.keys(w.part)
		execs[i] = rueidis.LuaExec{Keys: []string{zset, hash, ver},
			Args: []string{w.op, w.id, w.value, strconv.FormatInt(ms(w.ttl), 10), ch, b.shardedFlag(), candidate}}
	}
	err := b.callIdempotent(context.Background(), "presence write", func(ctx context.Context) error {
		var first error
		for _, w := range batch { // a second run starts over
			w.ok, w.err = false, nil
		}
		for i, r := range presenceScript.runMulti(ctx, b.client, execs) {
			w := batch[i]
			vs, err := r.ToArray()
			if err == nil && len(vs) != 2 {
				err = errors.New("malformed reply")
			}
			if err == nil {
				w.inc, err = vs[0].ToString()
			}
			if err == nil {
				w.version, err = vs[1].AsInt64()
			}
			if err != nil {
				w.err = b.classify(ctx, err)
				first = cmp.Or(first, err)
				continue
			}
			w.ok = true
		}
		return first
	})
	if err != nil {
		b.logFailure("redis: presence writes failed", err, "writes", len(batch))
	}
	for _, w := range batch {
		switch {
		case w.err != nil:
			w.err = fmt.Errorf("redis: %s: %w", w.what, w.err)
		case !w.ok:
			w.err = err // not sent (the breaker refused, the backend closed)
		}
		close(w.done)
	}
}

// failQueued fails the writes still queued when the store closes.
func (s *PresenceStore) failQueued() {
	for {
		select {
		case w := <-s.queue:
			w.err = fmt.Errorf("redis: %s: %w", w.what, ErrClosed)
			close(w.done)
		default:
			return
		}
	}
}

// sweeper removes expired entries every PresenceSweep, on every partition
// in one pipeline (again at once for a partition that had more than
// sweepLimit).
func (s *PresenceStore) sweeper() {
	defer s.wg.Done()
	b := s.b
	t := time.NewTicker(b.opts.PresenceSweep)
	defer t.Stop()
	parts := make([]int, b.opts.Partitions)
	for i := range parts {
		parts[i] = i
	}
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		todo := parts
		for len(todo) > 0 {
			execs := make([]rueidis.LuaExec, len(todo))
			candidate := b.newEpoch()
			for i, p := range todo {
				zset, hash, ver, ch := s.keys(p)
				execs[i] = rueidis.LuaExec{Keys: []string{zset, hash, ver},
					Args: []string{ch, b.shardedFlag(), strconv.Itoa(sweepLimit), candidate}}
			}
			var again []int
			err := b.callIdempotent(context.Background(), "presence sweep", func(ctx context.Context) error {
				var first error
				again = again[:0]
				for i, r := range sweepScript.runMulti(ctx, b.client, execs) {
					n, err := r.AsInt64()
					if err != nil && first == nil {
						first = err
					}
					if n >= sweepLimit {
						again = append(again, todo[i])
					}
				}
				return first
			})
			if err != nil {
				b.logFailure("redis: presence sweep failed", err)
				break
			}
			todo = again
			select {
			case <-s.stop:
				return
			default:
			}
		}
	}
}

// Close stops the writer (failing writes still queued), the sweeper and
// every watch. The backend's Close calls it.
func (s *PresenceStore) Close() error {
	s.closeOnce.Do(func() {
		select {
		case <-s.stop:
		default:
			close(s.stop)
		}
		s.wg.Wait()
		s.mu.Lock()
		watches := make([]*presenceWatch, 0, len(s.watches))
		for pw := range s.watches {
			watches = append(watches, pw)
		}
		s.mu.Unlock()
		for _, pw := range watches {
			pw.close()
		}
	})
	return nil
}

// presenceWatch is one Watch: a handler on every partition's change
// channel feeding one fabric.PresenceWatcher from one goroutine.
type presenceWatch struct {
	s        *PresenceStore
	w        fabric.PresenceWatcher
	handlers []*watchHandler
	events   chan watchEvent
	reload   chan struct{}

	mu      sync.Mutex
	inc     []string // per partition: the incarnation applied
	applied []int64  // per partition: the version applied
	changed chan struct{}
	closed  bool

	stop chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// watchHandler takes one partition's changes for a watch.
type watchHandler struct {
	pw   *presenceWatch
	part int
}

type watchEvent struct {
	part    int
	payload string
}

func (h *watchHandler) onMessage(payload string) {
	select {
	case h.pw.events <- watchEvent{part: h.part, payload: payload}:
	default:
		h.pw.requestReload() // the change is lost: start over
	}
}

// onResubscribed implements psListener: changes may have been missed.
func (pw *presenceWatch) onResubscribed() { pw.requestReload() }

func (pw *presenceWatch) requestReload() {
	select {
	case pw.reload <- struct{}{}:
	default:
	}
}

// Watch implements fabric.PresenceStore: it subscribes to every
// partition's changes, then loads every partition (one pipeline of
// snapshot scripts) and hands the watcher a Reset; changes published
// before a partition's snapshot are skipped by their versions, later ones
// are applied in order. stop unsubscribes and waits for the call in
// progress; it must not be called from inside the watcher.
func (s *PresenceStore) Watch(ctx context.Context, w fabric.PresenceWatcher) (func(), error) {
	if w == nil {
		return nil, errors.New("redis: presence watch: nil watcher")
	}
	select {
	case <-s.stop:
		return nil, fmt.Errorf("redis: presence watch: %w", ErrClosed)
	default:
	}
	n := s.b.opts.Partitions
	pw := &presenceWatch{s: s, w: w, events: make(chan watchEvent, watchQueue), reload: make(chan struct{}, 1),
		inc: make([]string, n), applied: make([]int64, n), changed: make(chan struct{}), stop: make(chan struct{})}
	s.b.ps.addListener(pw)
	for p := range n {
		h := &watchHandler{pw: pw, part: p}
		pw.handlers = append(pw.handlers, h)
		_, _, _, ch := s.keys(p)
		if err := s.b.ps.subscribe(ctx, ch, h, true); err != nil {
			pw.close()
			return nil, fmt.Errorf("redis: presence watch: %w", unavailable(err))
		}
	}
	s.mu.Lock()
	s.watches[pw] = struct{}{}
	s.mu.Unlock()
	ready := make(chan struct{})
	pw.wg.Add(1)
	go pw.run(ready)
	select {
	case <-ready:
		return pw.close, nil
	case <-ctx.Done():
		pw.close()
		return nil, fmt.Errorf("redis: presence watch: loading: %w", ctx.Err())
	}
}

func (pw *presenceWatch) close() {
	pw.once.Do(func() {
		s := pw.s
		s.mu.Lock()
		delete(s.watches, pw)
		s.mu.Unlock()
		s.b.ps.removeListener(pw)
		for p, h := range pw.handlers {
			_, _, _, ch := s.keys(p)
			s.b.ps.unsubscribe(ch, h)
		}
		close(pw.stop)
		pw.wg.Wait()
		pw.mu.Lock()
		pw.closed = true
		close(pw.changed)
		pw.mu.Unlock()
	})
}

// run loads and follows until close; a load that fails is retried with
// backoff.
func (pw *presenceWatch) run(ready chan struct{}) {
	defer pw.wg.Done()
	backoff := 50 * time.Millisecond
	for {
		if pw.load() {
			backoff = 50 * time.Millisecond
			if ready != nil {
				close(ready)
				ready = nil
			}
			if !pw.follow() {
				return
			}
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-pw.stop:
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// load reads every partition and hands the watcher a Reset.
func (pw *presenceWatch) load() bool {
	s := pw.s
	b := s.b
	n := b.opts.Partitions
	// A reload asked for before this load is answered by it.
	select {
	case <-pw.reload:
	default:
	}
	execs := make([]rueidis.LuaExec, n)
	for p := range n {
		zset, hash, ver, _ := s.keys(p)
		execs[p] = rueidis.LuaExec{Keys: []string{zset, hash, ver}}
	}
	incs := make([]string, n)
	vers := make([]int64, n)
	var entries []fabric.PresenceEntry
	err := b.callIdempotent(context.Background(), "presence load", func(ctx context.Context) error {
		entries = entries[:0] // a second run starts over
		for p, r := range snapshotScript.runMulti(ctx, b.client, execs) {
			vs, err := r.ToArray()
			if err != nil {
				return err
			}
			if len(vs) < 2 {
				return errors.New("snapshot: malformed reply")
			}
			incs[p], _ = vs[0].ToString()
			vers[p], _ = vs[1].AsInt64()
			for _, m := range vs[2:] {
				v, err := m.ToString()
				if err != nil {
					return err
				}
				if e, ok := pw.decode(v); ok {
					entries = append(entries, e)
				}
			}
		}
		return nil
	})
	if err != nil {
		b.logFailure("redis: presence load failed; retrying", err)
		return false
	}
	slices.SortFunc(entries, func(a, b fabric.PresenceEntry) int {
		return cmp.Or(strings.Compare(a.Topic, b.Topic), strings.Compare(a.Key, b.Key), strings.Compare(a.Instance, b.Instance))
	})
	pw.w.PresenceReset(entries)
	pw.mu.Lock()
	copy(pw.inc, incs)
	copy(pw.applied, vers)
	pw.signal()
	pw.mu.Unlock()
	return true
}

// follow applies changes in order until a reload is due (true) or the
// watch closes (false).
func (pw *presenceWatch) follow() bool {
	for {
		select {
		case <-pw.stop:
			return false
		case <-pw.reload:
			return true
		case ev := <-pw.events:
			if !pw.apply(ev) {
				return true
			}
		}
	}
}

// apply hands one change to the watcher; false means a change was missed
// (a gap in the versions, another incarnation): reload.
func (pw *presenceWatch) apply(ev watchEvent) bool {
	op, inc, v, body, ok := parseChange(ev.payload)
	if !ok {
		pw.s.b.log.Warn("redis: malformed presence change", "payload", clip(ev.payload))
		return true
	}
	pw.mu.Lock()
	cur, at := pw.inc[ev.part], pw.applied[ev.part]
	pw.mu.Unlock()
	switch {
	case inc == cur && v <= at:
		return true // older than the snapshot
	case inc == cur && v == at+1, cur == "" && at == 0 && v == 1:
	default:
		return false
	}
	switch op {
	case 'P':
		if e, ok := pw.decode(body); ok {
			pw.w.PresencePut(e)
		}
	case 'R':
		pw.w.PresenceRemoved(body)
	}
	pw.mu.Lock()
	pw.inc[ev.part], pw.applied[ev.part] = inc, v
	pw.signal()
	pw.mu.Unlock()
	return true
}

// signal wakes the writes waiting for this watch. pw.mu is held.
func (pw *presenceWatch) signal() {
	if pw.closed {
		return
	}
	close(pw.changed)
	pw.changed = make(chan struct{})
}

// waitApplied returns once the watch has applied version v of incarnation
// inc in partition p, or closed. A write to a partition that never had a
// change (inc "") has nothing to wait for; one of another incarnation than
// the watch's (Redis lost its data meanwhile) does not wait either.
func (pw *presenceWatch) waitApplied(ctx context.Context, p int, inc string, v int64) error {
	if inc == "" {
		return nil
	}
	for {
		pw.mu.Lock()
		cur, at, closed := pw.inc[p], pw.applied[p], pw.closed
		ch := pw.changed
		pw.mu.Unlock()
		if closed || cur == inc && at >= v || cur != inc && cur != "" {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// parseChange splits "<op><incarnation>:<version>:<body>".
func parseChange(p string) (op byte, inc string, v int64, body string, ok bool) {
	if len(p) < 4 || p[0] != 'P' && p[0] != 'R' {
		return 0, "", 0, "", false
	}
	rest := p[1:]
	i := strings.IndexByte(rest, ':')
	if i < 0 {
		return 0, "", 0, "", false
	}
	inc, rest = rest[:i], rest[i+1:]
	j := strings.IndexByte(rest, ':')
	if j < 0 {
		return 0, "", 0, "", false
	}
	v, err := strconv.ParseInt(rest[:j], 10, 64)
	if err != nil {
		return 0, "", 0, "", false
	}
	return p[0], inc, v, rest[j+1:], true
}

// decode reads a stored entry.
func (pw *presenceWatch) decode(v string) (fabric.PresenceEntry, bool) {
	var pv presenceValue
	if err := json.Unmarshal([]byte(v), &pv); err != nil || pv.Topic == "" {
		pw.s.b.log.Warn("redis: malformed presence entry", "value", clip(v), "err", err)
		return fabric.PresenceEntry{}, false
	}
	return fabric.PresenceEntry{ID: PresenceID(pv.Topic, pv.Key, pv.Instance), Topic: pv.Topic, Key: pv.Key,
		Instance: pv.Instance, Data: bytes.Clone(pv.Data)}, true
}

var (
	_ fabric.PresenceStore = (*PresenceStore)(nil)
	_ fabric.PresenceWrite = (*presenceWrite)(nil)
)
