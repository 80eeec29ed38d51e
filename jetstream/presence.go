// Package jetstream is Fabric's NATS backend: pub/sub on core NATS subjects
// (Broker), history on JetStream streams (History), presence entries and
// rate-limit bans on JetStream KV (PresenceStore, RateLimiter), leases on
// KV (LeaseStore), and cluster-wide counts and direct messages to users on
// core NATS (Cluster). Every NATS detail of Fabric lives in this package;
// the core package only sees the interfaces of fabric/backend.go.
package jetstream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of PresenceStoreOptions.
const (
	// DefaultPresenceKeepAlive is how often a store refreshes its keep-alive
	// key, the traffic by which a silent watcher is detected.
	DefaultPresenceKeepAlive = fabric.DefaultPresenceHeartbeat
	// DefaultPresenceMarkerTTL is how long the bucket keeps the marker an
	// expired or removed entry leaves behind.
	DefaultPresenceMarkerTTL = fabric.DefaultPresenceExpiry
)

// PresenceStoreOptions configures NewPresenceStore. The zero value has the
// defaults.
type PresenceStoreOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric"); the bucket is
	// "<prefix>_presence" unless Bucket says otherwise.
	Prefix string
	// Bucket names the KV bucket (default "<prefix>_presence").
	Bucket string
	// Replicas of the bucket (default 1). Use 3 in a cluster of 3 or more so
	// that presence survives the loss of an instance.
	Replicas int
	// FileStorage keeps the bucket on disk; by default it lives in memory
	// (presence is rebuilt by reconnecting clients anyway).
	FileStorage bool
	// KeepAlive is how often the store refreshes a key of its own, so that
	// every watcher sees traffic; a watcher silent for twice this long is
	// replaced (its consumer may sit on a server that died). Use the
	// presence heartbeat interval (default 15s).
	KeepAlive time.Duration
	// MarkerTTL is how long the marker of a removed or expired entry stays
	// in the bucket (default 30s, whole seconds; the bucket's
	// LimitMarkerTTL, fixed when it is created).
	MarkerTTL time.Duration
	// Logger receives warnings; nil discards them.
	Logger *slog.Logger
}

// PresenceStore is fabric.PresenceStore on a JetStream KV bucket with
// per-key TTLs.
//
// An entry is the key "<topic>.<user>.<instance>" (each part a kvToken)
// holding {"t","k","i","d"}; a Put is a raw publish carrying the TTL
// (nats.go's Update would drop it), a Remove a purge marker (without
// roll-up, so that a watcher that has not read the entry yet still sees it
// before its removal). An entry that is not refreshed expires by its TTL
// and leaves a marker that every watcher sees as a removal. Each Watch is
// one KV watcher (an ordered consumer); a watcher that stays silent past
// twice KeepAlive is replaced by a new one that reloads everything.
type PresenceStore struct {
	js        jetstream.JetStream
	kv        jetstream.KeyValue
	bucket    string
	putPrefix string
	opts      PresenceStoreOptions
	log       *slog.Logger
	aliveKey  string

	acks *ackDrainer

	mu      sync.Mutex
	watches map[*presenceWatch]struct{}

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// presenceValue is the JSON stored in an entry.
type presenceValue struct {
	Topic    string          `json:"t"`
	Key      string          `json:"k"`
	Instance string          `json:"i,omitempty"`
	Data     json.RawMessage `json:"d"`
}

// NewPresenceStore opens (or creates) the presence bucket and starts the
// store's keep-alive. Close stops it.
func NewPresenceStore(ctx context.Context, js jetstream.JetStream, opts PresenceStoreOptions) (*PresenceStore, error) {
	if js == nil {
		return nil, errors.New("jetstream: presence store needs a JetStream context")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Bucket == "" {
		opts.Bucket = nameToken(opts.Prefix) + "_presence"
	}
	if opts.KeepAlive <= 0 {
		opts.KeepAlive = DefaultPresenceKeepAlive
	}
	if opts.MarkerTTL <= 0 {
		opts.MarkerTTL = DefaultPresenceMarkerTTL
	}
	opts.MarkerTTL = ttlSeconds(opts.MarkerTTL)
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	var id [6]byte
	_, _ = rand.Read(id[:])
	s := &PresenceStore{js: js, bucket: opts.Bucket, opts: opts, log: opts.Logger,
		aliveKey: "_alive." + hex.EncodeToString(id[:]), watches: map[*presenceWatch]struct{}{}, stop: make(chan struct{})}
	storage := jetstream.MemoryStorage
	if opts.FileStorage {
		storage = jetstream.FileStorage
	}
	kv, err := ensureTTLBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:         opts.Bucket,
		Description:    "Fabric presence: <topic>.<user>.<instance>, refreshed by heartbeats",
		History:        presenceHistory,
		Storage:        storage,
		Replicas:       opts.Replicas,
		LimitMarkerTTL: opts.MarkerTTL,
	})
	if err != nil {
		return nil, fmt.Errorf("jetstream: presence: %w", err)
	}
	s.kv = kv
	s.putPrefix = kvPutPrefix(js, opts.Bucket)
	s.acks = newAckDrainer(s.log)
	s.alive()
	s.wg.Add(1)
	go s.keepAlive()
	return s, nil
}

// Bucket returns the name of the KV bucket.
func (s *PresenceStore) Bucket() string { return s.bucket }

// presenceHistory is how many writes of one key the bucket keeps (the KV
// maximum). A watcher receives every write still in the stream when it gets
// to it; with one kept per key, a join followed quickly by a leave could
// replace the join before a watcher saw it, and the pair would be folded
// away. Every write carries a TTL, so a key holds only the writes of its
// last TTL (about ExpireAfter/HeartbeatInterval + 1).
const presenceHistory = 64

// entryKey is the KV key of an entry.
func entryKey(topic, key, instance string) string {
	return kvToken(topic) + "." + kvToken(key) + "." + kvToken(instance)
}

// Put implements fabric.PresenceStore. Writes of one key go out in call
// order on the one NATS connection, and so reach the stream in that order.
func (s *PresenceStore) Put(e fabric.PresenceEntry, ttl time.Duration) fabric.PresenceWrite {
	data := e.Data
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	b, err := json.Marshal(presenceValue{Topic: e.Topic, Key: e.Key, Instance: e.Instance, Data: data})
	if err != nil {
		return failedWrite{fmt.Errorf("jetstream: presence put: %w", err)}
	}
	m := nats.NewMsg(s.putPrefix + entryKey(e.Topic, e.Key, e.Instance))
	m.Data = b
	return s.publish(m, ttl, "presence put")
}

// Remove implements fabric.PresenceStore: a purge marker, kept for the
// marker TTL so that markers of departed users do not pile up.
func (s *PresenceStore) Remove(topic, key, instance string) fabric.PresenceWrite {
	m := nats.NewMsg(s.putPrefix + entryKey(topic, key, instance))
	m.Header.Set("KV-Operation", "PURGE")
	return s.publish(m, s.opts.MarkerTTL, "presence remove")
}

func (s *PresenceStore) publish(m *nats.Msg, ttl time.Duration, what string) fabric.PresenceWrite {
	f, err := s.js.PublishMsgAsync(m, jetstream.WithMsgTTL(ttlSeconds(ttl)))
	if err != nil {
		logFailure(s.log, "jetstream: "+what+" failed", err, "subject", m.Subject)
		return failedWrite{fmt.Errorf("jetstream: %s: %w", what, unavailable(err))}
	}
	s.acks.add(f, what)
	return &presenceWrite{s: s, f: f, what: what}
}

// presenceWrite is a write whose acknowledgement a caller may wait for.
type presenceWrite struct {
	s    *PresenceStore
	f    jetstream.PubAckFuture
	what string
}

// Wait implements fabric.PresenceWrite: the ack, then every watcher of
// this store having applied the write's stream sequence.
func (w *presenceWrite) Wait(ctx context.Context) error {
	select {
	case ack := <-w.f.Ok():
		w.s.mu.Lock()
		watches := make([]*presenceWatch, 0, len(w.s.watches))
		for pw := range w.s.watches {
			watches = append(watches, pw)
		}
		w.s.mu.Unlock()
		for _, pw := range watches {
			if err := pw.applied.wait(ctx, ack.Sequence); err != nil {
				return fmt.Errorf("jetstream: %s: waiting for the watcher: %w", w.what, err)
			}
		}
		return nil
	case err := <-w.f.Err():
		return fmt.Errorf("jetstream: %s: %w", w.what, unavailable(err))
	case <-ctx.Done():
		return fmt.Errorf("jetstream: %s: %w", w.what, ctx.Err())
	}
}

// failedWrite is a write that never left.
type failedWrite struct{ err error }

func (f failedWrite) Wait(context.Context) error { return f.err }

// unavailable marks err as a backend outage (fabric.ErrBackendUnavailable).
func unavailable(err error) error {
	if err == nil || errors.Is(err, fabric.ErrBackendUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", fabric.ErrBackendUnavailable, err)
}

// alive refreshes the store's keep-alive key.
func (s *PresenceStore) alive() {
	m := nats.NewMsg(s.putPrefix + s.aliveKey)
	f, err := s.js.PublishMsgAsync(m, jetstream.WithMsgTTL(ttlSeconds(2*s.opts.KeepAlive+time.Second)))
	if err != nil {
		logFailure(s.log, "presence: keep-alive failed", err)
		return
	}
	s.acks.add(f, "presence alive")
}

func (s *PresenceStore) keepAlive() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.KeepAlive)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.alive()
		}
	}
}

// stallAfter is how long a watcher may stay silent before it is replaced.
func (s *PresenceStore) stallAfter() time.Duration { return 2*s.opts.KeepAlive + 100*time.Millisecond }

// Close stops the keep-alive (removing its key) and every watch.
func (s *PresenceStore) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
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
		m := nats.NewMsg(s.putPrefix + s.aliveKey)
		m.Header.Set("KV-Operation", "PURGE")
		if f, err := s.js.PublishMsgAsync(m, jetstream.WithMsgTTL(s.opts.MarkerTTL)); err == nil {
			select {
			case <-f.Ok():
			case <-f.Err():
			case <-time.After(time.Second):
			}
		}
		s.acks.stop()
	})
	return nil
}

// presenceWatch is one Watch: a KV watcher feeding one fabric.PresenceWatcher.
type presenceWatch struct {
	s       *PresenceStore
	w       fabric.PresenceWatcher
	applied seqWaiter
	ctx     context.Context
	cancel  context.CancelFunc
	stop    chan struct{}
	wg      sync.WaitGroup
	once    sync.Once
}

// Watch implements fabric.PresenceStore.
func (s *PresenceStore) Watch(ctx context.Context, w fabric.PresenceWatcher) (func(), error) {
	pw := &presenceWatch{s: s, w: w, stop: make(chan struct{})}
	pw.ctx, pw.cancel = context.WithCancel(context.Background())
	kw, err := s.kv.WatchAll(pw.ctx)
	if err != nil {
		pw.cancel()
		return nil, fmt.Errorf("jetstream: presence: watch %s: %w", s.bucket, unavailable(err))
	}
	s.mu.Lock()
	s.watches[pw] = struct{}{}
	s.mu.Unlock()
	ready := make(chan struct{})
	pw.wg.Add(1)
	go pw.run(kw, ready)
	select {
	case <-ready:
	case <-ctx.Done():
		pw.close()
		return nil, fmt.Errorf("jetstream: presence: loading %s: %w", s.bucket, ctx.Err())
	}
	return pw.close, nil
}

func (pw *presenceWatch) close() {
	pw.once.Do(func() {
		pw.s.mu.Lock()
		delete(pw.s.watches, pw)
		pw.s.mu.Unlock()
		close(pw.stop)
		pw.wg.Wait()
		pw.cancel()
	})
}

// run keeps the watcher fed until close. Each round loads a full snapshot,
// hands it over as a reset, then follows live changes. A watcher that
// stays silent for stallAfter (the keep-alive keys guarantee traffic) is
// replaced: its consumer may sit on a server that died, which nats.go would
// only notice after its own heartbeats (about ten seconds).
func (pw *presenceWatch) run(kw jetstream.KeyWatcher, ready chan struct{}) {
	defer pw.wg.Done()
	backoff := 50 * time.Millisecond
	for {
		if kw != nil {
			if entries, rev, ok := pw.load(kw); ok {
				pw.w.PresenceReset(entries)
				pw.applied.advance(rev)
				if ready != nil {
					close(ready)
					ready = nil
				}
				backoff = 50 * time.Millisecond
				pw.follow(kw)
			}
			// Stopping a watcher whose consumer sat on a dead server can
			// take nats.go's request timeout (5s): not on the way to the
			// replacement.
			old := kw
			pw.wg.Go(func() {
				_ = old.Stop()
				drainUpdates(old.Updates())
			})
		}
		select {
		case <-pw.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
		nw, err := pw.rewatch()
		if err != nil {
			logFailure(pw.s.log, "presence: restarting the watcher failed", err)
			kw = nil
			continue
		}
		kw = nw
	}
}

// rewatch starts a new KV watcher. Its consumer-create request can be stuck
// on a server that just died (the meta layer may place the consumer there
// before it notices) until nats.go's 5s request timeout: after a second
// (or stallAfter, if shorter) without an answer the attempt is abandoned
// (its watcher, if one comes, is stopped) and another one sent.
func (pw *presenceWatch) rewatch() (jetstream.KeyWatcher, error) {
	type result struct {
		w   jetstream.KeyWatcher
		err error
	}
	for {
		ch := make(chan result, 1)
		pw.wg.Go(func() {
			w, err := pw.s.kv.WatchAll(pw.ctx)
			ch <- result{w, err}
		})
		select {
		case r := <-ch:
			return r.w, r.err
		case <-time.After(min(pw.s.stallAfter(), time.Second)):
			pw.s.log.Warn("presence: starting a watcher is slow; trying again")
			pw.wg.Go(func() { // the abandoned attempt
				if r := <-ch; r.w != nil {
					_ = r.w.Stop()
					drainUpdates(r.w.Updates())
				}
			})
		case <-pw.stop:
			pw.wg.Go(func() {
				if r := <-ch; r.w != nil {
					_ = r.w.Stop()
				}
			})
			return nil, errors.New("presence watch closed")
		}
	}
}

// load reads a watcher's initial values. ok is false when the watch was
// closed, or the watcher failed or stalled first.
func (pw *presenceWatch) load(kw jetstream.KeyWatcher) (entries []fabric.PresenceEntry, rev uint64, ok bool) {
	current := map[string]fabric.PresenceEntry{}
	// A load may take long (a big bucket), but never stays silent: every
	// store refreshes its keep-alive key. A silent one has its consumer on
	// a server that died (the meta layer can place a new consumer there
	// before it notices), which nats.go would only detect with its own 5s
	// heartbeats.
	silence := pw.s.stallAfter()
	limit := time.NewTimer(silence)
	defer limit.Stop()
	updates := kw.Updates()
	for {
		select {
		case e, open := <-updates:
			if !open {
				return nil, 0, false
			}
			if e == nil {
				entries = make([]fabric.PresenceEntry, 0, len(current))
				for _, pe := range current {
					entries = append(entries, pe)
				}
				return entries, rev, true
			}
			limit.Reset(silence)
			rev = max(rev, e.Revision())
			if e.Operation() != jetstream.KeyValuePut {
				delete(current, e.Key())
			} else if pe, ok := pw.decode(e); ok {
				current[e.Key()] = pe
			}
		case <-limit.C:
			pw.s.log.Warn("presence: loading the bucket went silent; replacing the watcher", "silent", silence)
			return nil, 0, false
		case <-pw.stop:
			return nil, 0, false
		}
	}
}

// follow hands live changes over until close, or until the watcher closes
// or stalls.
func (pw *presenceWatch) follow(kw jetstream.KeyWatcher) {
	updates := kw.Updates()
	stall := pw.s.stallAfter()
	tick := time.NewTicker(max(pw.s.opts.KeepAlive/2, 10*time.Millisecond))
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case e, open := <-updates:
			if !open {
				return
			}
			last = time.Now()
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				if isEntryKey(e.Key()) {
					pw.w.PresenceRemoved(e.Key())
				}
			} else if pe, ok := pw.decode(e); ok {
				pw.w.PresencePut(pe)
			}
			pw.applied.advance(e.Revision())
		case now := <-tick.C:
			if now.Sub(last) > stall {
				pw.s.log.Warn("presence: watcher silent; replacing it", "silent", now.Sub(last).Round(time.Millisecond))
				return
			}
		case <-pw.stop:
			return
		}
	}
}

// isEntryKey reports keys of the form "<topic>.<user>.<instance>" (not the
// keep-alive keys "_alive.<id>").
func isEntryKey(k string) bool {
	i, j := strings.IndexByte(k, '.'), strings.LastIndexByte(k, '.')
	return i > 0 && j > i+1 && j < len(k)-1
}

// decode reads an entry; malformed ones (and keep-alive keys) are skipped.
func (pw *presenceWatch) decode(e jetstream.KeyValueEntry) (fabric.PresenceEntry, bool) {
	k := e.Key()
	if !isEntryKey(k) {
		return fabric.PresenceEntry{}, false
	}
	var v presenceValue
	if err := json.Unmarshal(e.Value(), &v); err != nil || v.Topic == "" {
		pw.s.log.Warn("presence: malformed entry", "key", k, "err", err)
		return fabric.PresenceEntry{}, false
	}
	if v.Instance == "" { // written by an older version
		v.Instance = k[strings.LastIndexByte(k, '.')+1:]
	}
	return fabric.PresenceEntry{ID: k, Topic: v.Topic, Key: v.Key, Instance: v.Instance, Data: v.Data}, true
}

// drainUpdates discards a stopped watcher's updates until its channel
// closes, for at most a few seconds.
func drainUpdates(updates <-chan jetstream.KeyValueEntry) {
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case _, ok := <-updates:
			if !ok {
				return
			}
		case <-t.C:
			return
		}
	}
}

var _ fabric.PresenceStore = (*PresenceStore)(nil)
