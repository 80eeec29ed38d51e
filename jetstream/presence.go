// Package jetstream implements Fabric's cluster-wide extensions on NATS
// JetStream: presence (who is on a topic, on every instance), token-bucket
// rate limits shared by every instance, and cluster-wide counts and direct
// messages to users.
package jetstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Presence defaults, the seed's (svelte-adapter-uws-extensions createPresence).
const (
	DefaultPresenceHeartbeat = 15 * time.Second
	DefaultPresenceExpiry    = 30 * time.Second
)

// PresenceOptions configures NewPresence. The zero value has the defaults.
type PresenceOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric"); the bucket is
	// "<prefix>_presence" unless Bucket says otherwise.
	Prefix string
	// Bucket names the KV bucket (default "<prefix>_presence").
	Bucket string
	// HeartbeatInterval is how often this instance refreshes its entries and
	// sends "heartbeat" events to presence subscribers (default 15s).
	HeartbeatInterval time.Duration
	// ExpireAfter is how long an entry outlives its last refresh: the users
	// of an instance that died without a word leave after at most this long
	// (default 30s; whole seconds, at least 1s, more than HeartbeatInterval).
	ExpireAfter time.Duration
	// Replicas of the bucket (default 1). Use 3 in a cluster of 3 or more so
	// that presence survives the loss of an instance.
	Replicas int
	// FileStorage keeps the bucket on disk; by default it lives in memory
	// (presence is rebuilt by reconnecting clients anyway).
	FileStorage bool
	// Topics selects the topics whose subscribers join presence
	// automatically (see fabric.MatchTopics); nil joins nobody
	// automatically, leaving Join and Leave to the application.
	Topics func(topic string) bool
	// Key returns the user key of a connection; connections with the same
	// key count once. Default: fabric.UserOrConnectionKey (the user id from
	// the user data, else one entry per connection).
	Key func(c *fabric.Client) string
	// Select returns the public fields of a user, sent as "data" in list,
	// join and leave events. Default: no data (null).
	Select func(userData any) any
	// NoObserver skips registering with the node: wire SubscribeHook and
	// CloseHook into the edge's hooks instead (then an unsubscribe does not
	// leave; closing the connection does).
	NoObserver bool
	// Logger receives warnings; nil uses the node's logger.
	Logger *slog.Logger
}

// Presence is cluster-wide presence on a JetStream KV bucket.
//
// Every instance writes one entry per (topic, user) it hosts, keyed
// "<topic>.<user>.<instance>" and kept alive by heartbeats with a per-message
// TTL; one KV watcher per instance folds every instance's entries into an
// in-memory view, per topic and user. A user joins when its first entry
// appears anywhere and leaves when its last one is purged or expires. Every
// instance sees the bucket's changes in the same order and so derives the
// same join and leave events; each sends them to its own subscribers of
// "__presence:T" only, so a client gets every event exactly once.
type Presence struct {
	node      *fabric.Node
	js        jetstream.JetStream
	kv        jetstream.KeyValue
	bucket    string
	putPrefix string
	inst      string
	ttl       time.Duration
	opts      PresenceOptions
	log       *slog.Logger
	seed      maphash.Seed

	view    [presenceShards]viewShard
	local   [presenceShards]localShard
	clients [presenceShards]clientShard

	applied   seqWaiter
	acks      *ackDrainer
	wctx      context.Context
	cancel    context.CancelFunc
	removeObs func()
	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

const presenceShards = 64

// viewShard holds part of the cluster-wide view, by topic token.
type viewShard struct {
	mu     sync.Mutex
	topics map[string]*vtopic
}

type vtopic struct {
	topic string
	users map[string]*vuser // by user token
}

type vuser struct {
	key     string
	data    json.RawMessage
	holders []string // instances with an entry for this user
}

// localShard holds part of this instance's own entries, by KV key.
type localShard struct {
	mu      sync.Mutex
	entries map[string]*lentry
}

type lentry struct {
	kvKey string
	value []byte
	conns int
}

// clientShard records which topics each local connection has joined.
type clientShard struct {
	mu sync.Mutex
	m  map[*fabric.Client]map[string]string // topic → KV key
}

// presenceValue is the JSON stored in an entry.
type presenceValue struct {
	Topic string          `json:"t"`
	Key   string          `json:"k"`
	Data  json.RawMessage `json:"d"`
}

// NewPresence opens (or creates) the presence bucket, loads the current
// presence of the whole cluster and starts this instance's watcher and
// heartbeat. Close stops them.
func NewPresence(ctx context.Context, node *fabric.Node, js jetstream.JetStream, opts PresenceOptions) (*Presence, error) {
	if node == nil || js == nil {
		return nil, errors.New("jetstream: presence needs a node and a JetStream context")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Bucket == "" {
		opts.Bucket = nameToken(opts.Prefix) + "_presence"
	}
	if opts.HeartbeatInterval <= 0 {
		opts.HeartbeatInterval = DefaultPresenceHeartbeat
	}
	if opts.ExpireAfter <= 0 {
		opts.ExpireAfter = DefaultPresenceExpiry
	}
	opts.ExpireAfter = ttlSeconds(opts.ExpireAfter)
	if opts.HeartbeatInterval >= opts.ExpireAfter {
		return nil, fmt.Errorf("jetstream: presence heartbeat interval %s must be shorter than expireAfter %s", opts.HeartbeatInterval, opts.ExpireAfter)
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	if opts.Key == nil {
		opts.Key = fabric.UserOrConnectionKey
	}
	p := &Presence{
		node: node, js: js, bucket: opts.Bucket, inst: node.ID(), ttl: opts.ExpireAfter,
		opts: opts, log: opts.Logger, seed: maphash.MakeSeed(), stop: make(chan struct{}),
	}
	if p.log == nil {
		p.log = node.Logger()
	}
	for i := range p.view {
		p.view[i].topics = map[string]*vtopic{}
		p.local[i].entries = map[string]*lentry{}
		p.clients[i].m = map[*fabric.Client]map[string]string{}
	}
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
		LimitMarkerTTL: p.ttl,
	})
	if err != nil {
		return nil, fmt.Errorf("jetstream: presence: %w", err)
	}
	p.kv = kv
	p.putPrefix = kvPutPrefix(js, opts.Bucket)

	p.wctx, p.cancel = context.WithCancel(context.Background())
	w, err := kv.WatchAll(p.wctx)
	if err != nil {
		p.cancel()
		return nil, fmt.Errorf("jetstream: presence: watch %s: %w", opts.Bucket, err)
	}
	p.acks = newAckDrainer(p.log)
	p.alive() // traffic for the watchers' stall detection
	ready := make(chan struct{})
	p.wg.Add(1)
	go p.watch(w, ready)
	select {
	case <-ready:
	case <-ctx.Done():
		p.Close()
		return nil, fmt.Errorf("jetstream: presence: loading %s: %w", opts.Bucket, ctx.Err())
	}
	p.wg.Add(1)
	go p.heartbeat()
	if !opts.NoObserver {
		p.removeObs = node.Observe(p)
	}
	return p, nil
}

// Bucket returns the name of the KV bucket.
func (p *Presence) Bucket() string { return p.bucket }

// Join adds c's user to topic's presence and returns once this instance's
// entry is stored and visible in this instance's view. A second connection
// of a user that already has an entry here returns at once.
func (p *Presence) Join(ctx context.Context, topic string, c *fabric.Client) error {
	f, err := p.join(topic, c, true)
	if err != nil {
		return fmt.Errorf("jetstream: presence join %q: %w", topic, err)
	}
	return p.await(ctx, f, "join")
}

// Leave removes c from topic's presence; its user leaves when none of its
// connections on any instance is left. It returns once this instance's
// entry is gone (if this was its last connection here).
func (p *Presence) Leave(ctx context.Context, topic string, c *fabric.Client) error {
	f, err := p.leave(topic, c)
	if err != nil {
		return fmt.Errorf("jetstream: presence leave %q: %w", topic, err)
	}
	return p.await(ctx, f, "leave")
}

// List returns topic's members across the cluster, one per user, from this
// instance's view (no KV round trip), in no particular order.
func (p *Presence) List(ctx context.Context, topic string) ([]fabric.PresenceMember, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	tt := kvToken(topic)
	s := p.viewShard(tt)
	s.mu.Lock()
	defer s.mu.Unlock()
	return members(s.topics[tt]), nil
}

// Count returns the number of users present on topic across the cluster.
func (p *Presence) Count(ctx context.Context, topic string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	tt := kvToken(topic)
	s := p.viewShard(tt)
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.topics[tt]; t != nil {
		return len(t.users), nil
	}
	return 0, nil
}

// Connected implements fabric.Observer (nothing to do).
func (p *Presence) Connected(*fabric.Client) {}

// Subscribed implements fabric.Observer: a subscribe to "__presence:T" is
// answered with T's list; a subscribe to a topic selected by Options.Topics
// joins it.
func (p *Presence) Subscribed(c *fabric.Client, topic string) {
	if inner, ok := strings.CutPrefix(topic, fabric.PresenceTopicPrefix); ok {
		tt := kvToken(inner)
		s := p.viewShard(tt)
		s.mu.Lock()
		p.sendList(c, topic, s.topics[tt])
		s.mu.Unlock()
		return
	}
	if p.auto(topic) {
		f, err := p.join(topic, c, false)
		if err != nil {
			p.log.Warn("presence: join failed", "topic", topic, "err", err)
		}
		p.acks.add(f, "presence join")
	}
}

// Unsubscribed implements fabric.Observer: leaving an automatic topic leaves
// its presence.
func (p *Presence) Unsubscribed(c *fabric.Client, topic string) {
	if p.auto(topic) {
		f, err := p.leave(topic, c)
		if err != nil {
			p.log.Warn("presence: leave failed", "topic", topic, "err", err)
		}
		p.acks.add(f, "presence leave")
	}
}

// Disconnected implements fabric.Observer: a closed connection leaves every
// topic it joined.
func (p *Presence) Disconnected(c *fabric.Client) { p.leaveAll(c) }

// SubscribeHook has the shape of wsedge.Hooks.Subscribe, for wiring presence
// into the edge instead of the node (Options.NoObserver): a subscribe to
// "__presence:T" subscribes the connection and sends T's list before any
// later event; a subscribe to a topic selected by Options.Topics joins it.
// It never denies. With the node observer registered it does nothing.
func (p *Presence) SubscribeHook(c *fabric.Client, topic string) bool {
	if !p.opts.NoObserver {
		return true
	}
	if inner, ok := strings.CutPrefix(topic, fabric.PresenceTopicPrefix); ok {
		tt := kvToken(inner)
		s := p.viewShard(tt)
		s.mu.Lock()
		// Subscribing under the view lock orders the list before any event
		// the watcher derives afterwards; the edge's own subscribe that
		// follows this hook is then a no-op.
		if err := p.node.Subscribe(c, topic); err == nil {
			p.sendList(c, topic, s.topics[tt])
		}
		s.mu.Unlock()
		return true
	}
	if p.auto(topic) {
		f, err := p.join(topic, c, true)
		if err != nil && !errors.Is(err, fabric.ErrClientClosed) {
			p.log.Warn("presence: join failed", "topic", topic, "err", err)
		}
		p.acks.add(f, "presence join")
	}
	return true
}

// CloseHook has the shape of wsedge.Hooks.Close: the connection leaves every
// topic it joined. With the node observer registered it does nothing more
// than the observer already did.
func (p *Presence) CloseHook(c *fabric.Client, _ int, _ string) { p.leaveAll(c) }

// Close leaves every topic this instance's connections joined (their users
// leave everywhere at once instead of after ExpireAfter; it waits up to 2s
// for those writes) and stops the watcher and the heartbeat.
func (p *Presence) Close() error {
	p.closeOnce.Do(func() {
		if p.removeObs != nil {
			p.removeObs()
		}
		close(p.stop)
		for i := range p.clients {
			cs := &p.clients[i]
			cs.mu.Lock()
			clear(cs.m)
			cs.mu.Unlock()
		}
		var purges []jetstream.PubAckFuture
		for i := range p.local {
			ls := &p.local[i]
			ls.mu.Lock()
			for k := range ls.entries {
				if f, err := p.purge(k); err == nil {
					purges = append(purges, f)
				}
			}
			clear(ls.entries)
			ls.mu.Unlock()
		}
		if f, err := p.purge(aliveKey(p.inst)); err == nil {
			purges = append(purges, f)
		}
		// Wait for these purges only (not for older writes whose
		// acknowledgement may have been lost), and not for long.
		deadline := time.NewTimer(2 * time.Second)
	wait:
		for _, f := range purges {
			select {
			case <-f.Ok():
			case <-f.Err():
			case <-deadline.C:
				break wait
			}
		}
		deadline.Stop()
		p.wg.Wait()
		p.cancel()
		p.acks.stop()
	})
	return nil
}

func (p *Presence) auto(topic string) bool {
	return p.opts.Topics != nil && !fabric.IsReserved(topic) && p.opts.Topics(topic)
}

func (p *Presence) shardIndex(topicToken string) uint64 {
	return maphash.String(p.seed, topicToken) % presenceShards
}

func (p *Presence) viewShard(topicToken string) *viewShard {
	return &p.view[p.shardIndex(topicToken)]
}

func (p *Presence) localShard(kvKey string) *localShard {
	return &p.local[maphash.String(p.seed, kvKey)%presenceShards]
}

func (p *Presence) clientShard(c *fabric.Client) *clientShard {
	return &p.clients[c.ID()%presenceShards]
}

// join records (c, topic) and, for the user's first connection on this
// instance, writes the entry. The returned future (nil when nothing was
// written) acknowledges the write.
func (p *Presence) join(topic string, c *fabric.Client, checkClosed bool) (jetstream.PubAckFuture, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return nil, err
	}
	if fabric.IsReserved(topic) {
		return nil, fmt.Errorf("%w %q: reserved topics have no presence", fabric.ErrInvalidTopic, topic)
	}
	key := p.opts.Key(c)
	kvKey := kvToken(topic) + "." + kvToken(key) + "." + p.inst
	cs := p.clientShard(c)
	cs.mu.Lock()
	ts := cs.m[c]
	if _, dup := ts[topic]; dup {
		cs.mu.Unlock()
		return nil, nil
	}
	if ts == nil {
		ts = make(map[string]string, 1)
		cs.m[c] = ts
	}
	ts[topic] = kvKey
	ls := p.localShard(kvKey)
	ls.mu.Lock()
	e := ls.entries[kvKey]
	if e == nil {
		e = &lentry{kvKey: kvKey, value: p.encodeValue(topic, key, c)}
		ls.entries[kvKey] = e
	}
	e.conns++
	var f jetstream.PubAckFuture
	var err error
	if e.conns == 1 {
		f, err = p.put(e)
	}
	ls.mu.Unlock()
	cs.mu.Unlock()
	if checkClosed && c.Closed() {
		// Raced with the disconnect, which may have run before the record
		// existed: undo (leave is idempotent).
		lf, _ := p.leave(topic, c)
		p.acks.add(f, "presence join")
		p.acks.add(lf, "presence leave")
		return nil, fabric.ErrClientClosed
	}
	return f, err
}

// leave drops the (c, topic) record and, for the user's last connection on
// this instance, purges the entry.
func (p *Presence) leave(topic string, c *fabric.Client) (jetstream.PubAckFuture, error) {
	cs := p.clientShard(c)
	cs.mu.Lock()
	defer cs.mu.Unlock()
	ts := cs.m[c]
	kvKey, ok := ts[topic]
	if !ok {
		return nil, nil
	}
	delete(ts, topic)
	if len(ts) == 0 {
		delete(cs.m, c)
	}
	return p.release(kvKey)
}

func (p *Presence) leaveAll(c *fabric.Client) {
	cs := p.clientShard(c)
	cs.mu.Lock()
	ts := cs.m[c]
	delete(cs.m, c)
	for topic, kvKey := range ts {
		f, err := p.release(kvKey)
		if err != nil {
			p.log.Warn("presence: leave failed", "topic", topic, "err", err)
		}
		p.acks.add(f, "presence leave")
	}
	cs.mu.Unlock()
}

// release drops one connection from a local entry and purges it when it
// was the last. The caller holds the client shard lock.
func (p *Presence) release(kvKey string) (jetstream.PubAckFuture, error) {
	ls := p.localShard(kvKey)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	e := ls.entries[kvKey]
	if e == nil {
		return nil, nil
	}
	e.conns--
	if e.conns > 0 {
		return nil, nil
	}
	delete(ls.entries, kvKey)
	return p.purge(kvKey)
}

// put writes (or refreshes) an entry with the presence TTL. Callers hold
// the entry's local shard lock, which orders every write of one key on the
// one NATS connection, and so in the stream.
func (p *Presence) put(e *lentry) (jetstream.PubAckFuture, error) {
	m := nats.NewMsg(p.putPrefix + e.kvKey)
	m.Data = e.value
	return p.js.PublishMsgAsync(m, jetstream.WithMsgTTL(p.ttl))
}

// aliveKey is this instance's keep-alive key: refreshed every heartbeat
// whatever the instance hosts, it guarantees every watcher some traffic.
func aliveKey(inst string) string { return "_alive." + inst }

// alive refreshes this instance's keep-alive key.
func (p *Presence) alive() {
	m := nats.NewMsg(p.putPrefix + aliveKey(p.inst))
	f, err := p.js.PublishMsgAsync(m, jetstream.WithMsgTTL(p.ttl))
	if err != nil {
		logFailure(p.log, "presence: keep-alive failed", err)
		return
	}
	p.acks.add(f, "presence alive")
}

// presenceHistory is how many writes of one key the bucket keeps (the KV
// maximum). A watcher receives every write still in the stream when it gets
// to it; with one kept per key, a join followed quickly by a leave could
// replace the join before a watcher saw it, and the pair would be folded
// away. Every write carries the TTL, so a key holds only the writes of the
// last ExpireAfter (about ExpireAfter/HeartbeatInterval + 1).
const presenceHistory = 64

// purge removes an entry: a purge marker without roll-up, so that the join
// it follows stays in the stream for watchers that have not read it yet.
// The marker carries the TTL too, so markers of departed users do not pile
// up in the bucket.
func (p *Presence) purge(kvKey string) (jetstream.PubAckFuture, error) {
	m := nats.NewMsg(p.putPrefix + kvKey)
	m.Header.Set("KV-Operation", "PURGE")
	return p.js.PublishMsgAsync(m, jetstream.WithMsgTTL(p.ttl))
}

func (p *Presence) encodeValue(topic, key string, c *fabric.Client) []byte {
	data := json.RawMessage("null")
	if p.opts.Select != nil {
		d, err := fabric.EncodeData(p.opts.Select(c.UserData()))
		if err != nil {
			p.log.Warn("presence: select returned data that is not JSON", "err", err)
		} else {
			data = d
		}
	}
	b, _ := json.Marshal(presenceValue{Topic: topic, Key: key, Data: data}) // strings and checked JSON
	return b
}

// await waits for a write's acknowledgement and for this instance's watcher
// to have applied it.
func (p *Presence) await(ctx context.Context, f jetstream.PubAckFuture, what string) error {
	if f == nil {
		return nil
	}
	select {
	case ack := <-f.Ok():
		if err := p.applied.wait(ctx, ack.Sequence); err != nil {
			return fmt.Errorf("jetstream: presence %s: waiting for the watcher: %w", what, err)
		}
		return nil
	case err := <-f.Err():
		return fmt.Errorf("jetstream: presence %s: %w", what, err)
	case <-ctx.Done():
		p.acks.add(f, "presence "+what)
		return fmt.Errorf("jetstream: presence %s: %w", what, ctx.Err())
	}
}

// watch keeps the view in step with the bucket until Close. Each round
// loads a full snapshot, installs it (sending the joins and leaves that
// differ from the previous view), then follows live changes. A watcher that
// stays silent for stallAfter (every instance refreshes its alive key each
// heartbeat, so a healthy one never is) is replaced: its consumer may sit on
// a server that died, which nats.go would only notice after its own
// heartbeats (about ten seconds).
func (p *Presence) watch(w jetstream.KeyWatcher, ready chan struct{}) {
	defer p.wg.Done()
	backoff := 50 * time.Millisecond
	for {
		if w != nil {
			if shards, rev, ok := p.load(w); ok {
				p.install(shards)
				p.applied.advance(rev)
				if ready != nil {
					close(ready)
					ready = nil
				}
				backoff = 50 * time.Millisecond
				p.follow(w)
			}
			// Stopping a watcher whose consumer sat on a dead server can
			// take nats.go's request timeout (5s): not on the way to the
			// replacement.
			old := w
			p.wg.Go(func() {
				_ = old.Stop()
				drainUpdates(old.Updates())
			})
		}
		select {
		case <-p.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
		nw, err := p.rewatch()
		if err != nil {
			logFailure(p.log, "presence: restarting the watcher failed", err)
			w = nil
			continue
		}
		w = nw
	}
}

// rewatch starts a new watcher. Its consumer-create request can be stuck on
// a server that just died (the meta layer may place the consumer there
// before it notices) until nats.go's 5s request timeout: after a second
// (or stallAfter, if shorter) without an answer the attempt is abandoned
// (its watcher, if one comes, is stopped) and another one sent.
func (p *Presence) rewatch() (jetstream.KeyWatcher, error) {
	type result struct {
		w   jetstream.KeyWatcher
		err error
	}
	for {
		ch := make(chan result, 1)
		p.wg.Go(func() {
			w, err := p.kv.WatchAll(p.wctx)
			ch <- result{w, err}
		})
		select {
		case r := <-ch:
			return r.w, r.err
		case <-time.After(min(p.stallAfter(), time.Second)):
			p.log.Warn("presence: starting a watcher is slow; trying again")
			p.wg.Go(func() { // the abandoned attempt
				if r := <-ch; r.w != nil {
					_ = r.w.Stop()
					drainUpdates(r.w.Updates())
				}
			})
		case <-p.stop:
			p.wg.Go(func() {
				if r := <-ch; r.w != nil {
					_ = r.w.Stop()
				}
			})
			return nil, errors.New("presence closed")
		}
	}
}

// stallAfter is how long a watcher may stay silent before it is replaced.
func (p *Presence) stallAfter() time.Duration {
	return 2*p.opts.HeartbeatInterval + 100*time.Millisecond
}

// load reads a watcher's initial values into a fresh view, by shard. ok is
// false when Close was called or the watcher failed or stalled first.
func (p *Presence) load(w jetstream.KeyWatcher) (shards [presenceShards]map[string]*vtopic, rev uint64, ok bool) {
	for i := range shards {
		shards[i] = map[string]*vtopic{}
	}
	// A load may take long (a big bucket), but never stays silent: every
	// instance refreshes its keep-alive key each heartbeat. A silent one has
	// its consumer on a server that died (the meta layer can place a new
	// consumer there before it notices), which nats.go would only detect
	// with its own 5s heartbeats.
	silence := p.stallAfter()
	limit := time.NewTimer(silence)
	defer limit.Stop()
	updates := w.Updates()
	for {
		select {
		case e, open := <-updates:
			if !open {
				return shards, 0, false
			}
			if e == nil {
				return shards, rev, true
			}
			limit.Reset(silence)
			rev = max(rev, e.Revision())
			if tt, ut, inst, ok := splitKey(e.Key()); ok {
				p.fold(shards[p.shardIndex(tt)], tt, ut, inst, e)
			}
		case <-limit.C:
			p.log.Warn("presence: loading the bucket went silent; replacing the watcher", "silent", silence)
			return shards, 0, false
		case <-p.stop:
			return shards, 0, false
		}
	}
}

// install replaces the view with a loaded one and sends, per topic, the
// leaves and joins between the two to local presence subscribers.
func (p *Presence) install(shards [presenceShards]map[string]*vtopic) {
	for i := range p.view {
		s := &p.view[i]
		s.mu.Lock()
		old, cur := s.topics, shards[i]
		for tt, ot := range old {
			nt := cur[tt]
			for ut, u := range ot.users {
				if nt == nil || nt.users[ut] == nil {
					p.emit(ot.topic, "leave", fabric.PresenceMember{Key: u.key, Data: u.data})
				}
			}
		}
		for tt, nt := range cur {
			ot := old[tt]
			for ut, u := range nt.users {
				if ot == nil || ot.users[ut] == nil {
					p.emit(nt.topic, "join", fabric.PresenceMember{Key: u.key, Data: u.data})
				}
			}
		}
		s.topics = cur
		s.mu.Unlock()
	}
}

// follow applies live changes until Close, or until the watcher closes or
// stalls.
func (p *Presence) follow(w jetstream.KeyWatcher) {
	updates := w.Updates()
	stall := p.stallAfter()
	tick := time.NewTicker(max(p.opts.HeartbeatInterval/2, 10*time.Millisecond))
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
			p.apply(e)
			p.applied.advance(e.Revision())
		case now := <-tick.C:
			if now.Sub(last) > stall {
				p.log.Warn("presence: watcher silent; replacing it", "silent", now.Sub(last).Round(time.Millisecond))
				return
			}
		case <-p.stop:
			return
		}
	}
}

// splitKey splits "<topic>.<user>.<instance>"; other keys (the alive keys
// "_alive.<instance>") are not entries.
func splitKey(k string) (tt, ut, inst string, ok bool) {
	i, j := strings.IndexByte(k, '.'), strings.LastIndexByte(k, '.')
	if i <= 0 || j <= i+1 || j == len(k)-1 {
		return "", "", "", false
	}
	return k[:i], k[i+1 : j], k[j+1:], true
}

// apply folds one live KV change into the view and sends the join or leave
// it causes to this instance's presence subscribers. Every instance applies
// the same changes in the same order, so every instance derives the same
// events.
func (p *Presence) apply(e jetstream.KeyValueEntry) {
	tt, ut, inst, ok := splitKey(e.Key())
	if !ok {
		return
	}
	s := &p.view[p.shardIndex(tt)]
	s.mu.Lock()
	defer s.mu.Unlock()
	if event, t, u := p.fold(s.topics, tt, ut, inst, e); event != "" {
		p.emit(t.topic, event, fabric.PresenceMember{Key: u.key, Data: u.data})
	}
}

// fold applies one change to topics and reports the event it causes
// ("join", "leave" or "") with the topic and user concerned.
func (p *Presence) fold(topics map[string]*vtopic, tt, ut, inst string, e jetstream.KeyValueEntry) (string, *vtopic, *vuser) {
	t := topics[tt]
	if e.Operation() == jetstream.KeyValuePut {
		if t != nil {
			if u := t.users[ut]; u != nil {
				if !hasString(u.holders, inst) {
					u.holders = append(u.holders, inst)
				}
				return "", nil, nil // a heartbeat, or another instance of a present user
			}
		}
		var v presenceValue
		if err := json.Unmarshal(e.Value(), &v); err != nil || v.Topic == "" {
			p.log.Warn("presence: malformed entry", "key", e.Key(), "err", err)
			return "", nil, nil
		}
		if len(v.Data) == 0 {
			v.Data = json.RawMessage("null")
		}
		if t == nil {
			t = &vtopic{topic: v.Topic, users: map[string]*vuser{}}
			topics[tt] = t
		}
		u := &vuser{key: v.Key, data: v.Data, holders: []string{inst}}
		t.users[ut] = u
		return "join", t, u
	}
	// Delete, purge, or the marker an expired entry leaves behind.
	if t == nil {
		return "", nil, nil
	}
	u := t.users[ut]
	if u == nil {
		return "", nil, nil
	}
	u.holders = removeString(u.holders, inst)
	if len(u.holders) > 0 {
		return "", nil, nil
	}
	delete(t.users, ut)
	if len(t.users) == 0 {
		delete(topics, tt)
	}
	return "leave", t, u
}

// emit sends a presence event to this instance's subscribers of
// "__presence:"+topic. It runs under the topic's view lock, which orders it
// after the list those subscribers were sent.
func (p *Presence) emit(topic, event string, data any) {
	if _, err := p.node.PublishLocal(fabric.PresenceTopicPrefix+topic, event, data); err != nil {
		p.log.Debug("presence: event not sent", "topic", topic, "event", event, "err", err)
	}
}

// sendList sends c the list of t (nil: empty) on presTopic. The caller
// holds t's view lock. The JSON is assembled directly: keys are escaped,
// data is already JSON (checked when the entry was decoded).
func (p *Presence) sendList(c *fabric.Client, presTopic string, t *vtopic) {
	if fabric.ValidateTopic(presTopic) != nil {
		return // "__presence:" made a topic of 256 characters too long
	}
	size := 2
	if t != nil {
		for _, u := range t.users {
			size += len(u.key) + len(u.data) + 24
		}
	}
	data := make([]byte, 0, size)
	data = append(data, '[')
	if t != nil {
		first := true
		for _, u := range t.users {
			if !first {
				data = append(data, ',')
			}
			first = false
			data = append(data, `{"key":`...)
			data = appendJSONString(data, u.key)
			data = append(data, `,"data":`...)
			data = append(data, u.data...)
			data = append(data, '}')
		}
	}
	data = append(data, ']')
	p.node.SendEnvelope([]*fabric.Client{c}, presTopic, fabric.Envelope(presTopic, "list", data))
}

// appendJSONString appends s as a JSON string: quotes, backslashes and
// control characters escaped, invalid UTF-8 replaced as encoding/json does.
func appendJSONString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				dst = append(dst, '\\', c)
			case c < 0x20:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				dst = append(dst, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, `\ufffd`...)
		} else {
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return append(dst, '"')
}

func members(t *vtopic) []fabric.PresenceMember {
	if t == nil {
		return []fabric.PresenceMember{}
	}
	out := make([]fabric.PresenceMember, 0, len(t.users))
	for _, u := range t.users {
		out = append(out, fabric.PresenceMember{Key: u.key, Data: u.data})
	}
	return out
}

// heartbeat refreshes this instance's entries and sends "heartbeat" events
// (the active keys) to local presence subscribers, every HeartbeatInterval.
func (p *Presence) heartbeat() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.HeartbeatInterval)
	defer t.Stop()
	var futures []jetstream.PubAckFuture
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		p.alive()
		for i := range p.local {
			ls := &p.local[i]
			futures = futures[:0]
			ls.mu.Lock()
			for _, e := range ls.entries {
				f, err := p.put(e)
				if err != nil {
					logFailure(p.log, "presence: heartbeat failed", err, "key", e.kvKey)
					continue
				}
				futures = append(futures, f)
			}
			ls.mu.Unlock()
			for _, f := range futures {
				p.acks.add(f, "presence heartbeat")
			}
		}
		p.node.Topics(func(topic string, _ int) {
			inner, ok := strings.CutPrefix(topic, fabric.PresenceTopicPrefix)
			if !ok {
				return
			}
			tt := kvToken(inner)
			s := p.viewShard(tt)
			s.mu.Lock()
			keys := []string{}
			if vt := s.topics[tt]; vt != nil {
				keys = make([]string, 0, len(vt.users))
				for _, u := range vt.users {
					keys = append(keys, u.key)
				}
			}
			p.emit(inner, "heartbeat", keys)
			s.mu.Unlock()
		})
	}
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

func hasString(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

func removeString(xs []string, s string) []string {
	for i, x := range xs {
		if x == s {
			xs[i] = xs[len(xs)-1]
			return xs[:len(xs)-1]
		}
	}
	return xs
}

// Interface checks.
var (
	_ fabric.Presence = (*Presence)(nil)
	_ fabric.Observer = (*Presence)(nil)
)
