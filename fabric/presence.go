package fabric

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
)

// Presence defaults, the seed's (svelte-adapter-uws-extensions createPresence).
const (
	DefaultPresenceHeartbeat = 15 * time.Second
	DefaultPresenceExpiry    = 30 * time.Second
)

// PresenceTopicPrefix starts the topic on which presence events for topic T
// reach clients: "__presence:" + T.
const PresenceTopicPrefix = "__presence:"

// PresenceMember is one entry of a topic's presence list, in the wire shape
// of the svelte-adapter-uws presence client ({key, data}).
type PresenceMember struct {
	// Key identifies the user (or the connection, for anonymous ones).
	Key string `json:"key"`
	// Data is the user's public fields, as the presence's select function
	// returned them.
	Data json.RawMessage `json:"data"`
}

// PresenceOptions configures NewPresence. The zero value has the defaults.
type PresenceOptions struct {
	// HeartbeatInterval is how often this instance refreshes its entries and
	// sends "heartbeat" events to presence subscribers (default 15s).
	HeartbeatInterval time.Duration
	// ExpireAfter is how long an entry outlives its last refresh: the users
	// of an instance that died without a word leave after at most this long
	// (default 30s; more than HeartbeatInterval).
	ExpireAfter time.Duration
	// Topics selects the topics whose subscribers join presence
	// automatically (see MatchTopics); nil joins nobody automatically,
	// leaving Join and Leave to the application.
	Topics func(topic string) bool
	// Key returns the user key of a connection; connections with the same
	// key count once. Default: UserOrConnectionKey.
	Key func(c *Client) string
	// Select returns the public fields of a user, sent as "data" in list,
	// join and leave events. Default: no data (null).
	Select func(userData any) any
	// Logger receives warnings; nil uses the node's logger.
	Logger *slog.Logger
}

// Presence tracks who is on a topic across every instance, one member per
// user, and speaks the presence protocol of the svelte-adapter-uws presence
// client: a subscriber of "__presence:T" first gets T's "list", then "join"
// and "leave" events, and "heartbeat" events (the present keys) every
// HeartbeatInterval.
//
// It keeps one entry per (topic, user) this instance hosts in a
// PresenceStore, refreshed every heartbeat, and folds the store's change
// feed (every instance's entries) into an in-memory view: a user joins when
// its first entry appears anywhere and leaves when its last one is removed
// or expires. Each instance sends the events it derives to its own
// subscribers only, so a client gets every event once.
type Presence struct {
	node  *Node
	store PresenceStore
	inst  string
	opts  PresenceOptions
	log   *slog.Logger
	seed  maphash.Seed

	view    [presenceShards]viewShard
	local   [presenceShards]localShard
	clients [presenceShards]clientShard

	// byID maps store entry IDs to where they sit in the view. Only the
	// store's watcher calls touch it, one at a time.
	byID map[string]entryRef

	stopWatch func()
	removeObs func()
	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

const presenceShards = 64

// viewShard holds part of the cluster-wide view, by topic.
type viewShard struct {
	mu     sync.Mutex
	topics map[string]*vtopic
}

type vtopic struct {
	users map[string]*vuser // by user key
}

type vuser struct {
	data    json.RawMessage
	holders []string // instances with an entry for this user
}

type entryRef struct{ topic, key, inst string }

// localShard holds part of this instance's own entries, by topic and key.
type localShard struct {
	mu      sync.Mutex
	entries map[localKey]*lentry
}

type localKey struct{ topic, key string }

type lentry struct {
	entry PresenceEntry
	conns int
}

// clientShard records which topics each local connection has joined.
type clientShard struct {
	mu sync.Mutex
	m  map[*Client]map[string]localKey
}

// NewPresence starts presence for node on store: it loads every instance's
// entries, then follows the store's changes and refreshes this instance's
// entries every heartbeat. It registers with the node as an Observer, so
// subscribes to "__presence:T" are answered and subscribers of Topics join
// and leave, whatever the transport. Close stops it.
func NewPresence(ctx context.Context, node *Node, store PresenceStore, opts PresenceOptions) (*Presence, error) {
	if node == nil || store == nil {
		return nil, errors.New("fabric: presence needs a node and a store")
	}
	if opts.HeartbeatInterval <= 0 {
		opts.HeartbeatInterval = DefaultPresenceHeartbeat
	}
	if opts.ExpireAfter <= 0 {
		opts.ExpireAfter = DefaultPresenceExpiry
	}
	if opts.HeartbeatInterval >= opts.ExpireAfter {
		return nil, fmt.Errorf("fabric: presence heartbeat interval %s must be shorter than expireAfter %s", opts.HeartbeatInterval, opts.ExpireAfter)
	}
	if opts.Key == nil {
		opts.Key = UserOrConnectionKey
	}
	p := &Presence{node: node, store: store, inst: node.ID(), opts: opts, log: opts.Logger,
		seed: maphash.MakeSeed(), byID: map[string]entryRef{}, stop: make(chan struct{})}
	if p.log == nil {
		p.log = node.Logger()
	}
	for i := range p.view {
		p.view[i].topics = map[string]*vtopic{}
		p.local[i].entries = map[localKey]*lentry{}
		p.clients[i].m = map[*Client]map[string]localKey{}
	}
	stop, err := store.Watch(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("fabric: presence: %w", err)
	}
	p.stopWatch = stop
	p.wg.Add(1)
	go p.heartbeat()
	p.removeObs = node.Observe(p)
	return p, nil
}

// Join adds c's user to topic's presence and returns once this instance's
// entry is stored and visible in this instance's view. A second connection
// of a user that already has an entry here returns at once.
func (p *Presence) Join(ctx context.Context, topic string, c *Client) error {
	w, err := p.join(topic, c, true)
	if err != nil {
		return fmt.Errorf("fabric: presence join %q: %w", clip(topic), err)
	}
	if w != nil {
		if err := w.Wait(ctx); err != nil {
			return fmt.Errorf("fabric: presence join %q: %w", clip(topic), err)
		}
	}
	return nil
}

// Leave removes c from topic's presence; its user leaves when none of its
// connections on any instance is left. It returns once this instance's
// entry is gone (if this was its last connection here).
func (p *Presence) Leave(ctx context.Context, topic string, c *Client) error {
	if w := p.leave(topic, c); w != nil {
		if err := w.Wait(ctx); err != nil {
			return fmt.Errorf("fabric: presence leave %q: %w", clip(topic), err)
		}
	}
	return nil
}

// List returns topic's members across the cluster, one per user, from this
// instance's view (no store round trip), in no particular order.
func (p *Presence) List(ctx context.Context, topic string) ([]PresenceMember, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s := p.viewShard(topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	return members(s.topics[topic]), nil
}

// Count returns the number of users present on topic across the cluster.
func (p *Presence) Count(ctx context.Context, topic string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s := p.viewShard(topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.topics[topic]; t != nil {
		return len(t.users), nil
	}
	return 0, nil
}

// Connected implements Observer (nothing to do).
func (p *Presence) Connected(*Client) {}

// Subscribed implements Observer: a subscribe to "__presence:T" is answered
// with T's list; a subscribe to a topic selected by Options.Topics joins it.
func (p *Presence) Subscribed(c *Client, topic string) {
	if inner, ok := strings.CutPrefix(topic, PresenceTopicPrefix); ok {
		s := p.viewShard(inner)
		s.mu.Lock()
		p.sendList(c, topic, s.topics[inner])
		s.mu.Unlock()
		return
	}
	if p.auto(topic) {
		if _, err := p.join(topic, c, false); err != nil && !errors.Is(err, errPresenceLimit) {
			p.log.Warn("presence: join failed", "topic", topic, "err", err)
		}
	}
}

// Unsubscribed implements Observer: leaving an automatic topic leaves its
// presence.
func (p *Presence) Unsubscribed(c *Client, topic string) {
	if p.auto(topic) {
		p.leave(topic, c)
	}
}

// Disconnected implements Observer: a closed connection leaves every topic
// it joined.
func (p *Presence) Disconnected(c *Client) { p.leaveAll(c) }

// Close leaves every topic this instance's connections joined (their users
// leave everywhere at once instead of after ExpireAfter; it waits up to 2s
// for those writes) and stops the heartbeat and the store feed.
func (p *Presence) Close() error {
	p.closeOnce.Do(func() {
		p.removeObs()
		close(p.stop)
		p.wg.Wait()
		for i := range p.clients {
			cs := &p.clients[i]
			cs.mu.Lock()
			clear(cs.m)
			cs.mu.Unlock()
		}
		var writes []PresenceWrite
		for i := range p.local {
			ls := &p.local[i]
			ls.mu.Lock()
			for k := range ls.entries {
				writes = append(writes, p.store.Remove(k.topic, k.key, p.inst))
			}
			clear(ls.entries)
			ls.mu.Unlock()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		for _, w := range writes {
			if w.Wait(ctx) != nil {
				break
			}
		}
		cancel()
		p.stopWatch()
	})
	return nil
}

func (p *Presence) auto(topic string) bool {
	return p.opts.Topics != nil && !IsReserved(topic) && p.opts.Topics(topic)
}

func (p *Presence) shard(s string) uint64 { return maphash.String(p.seed, s) % presenceShards }

func (p *Presence) viewShard(topic string) *viewShard { return &p.view[p.shard(topic)] }

func (p *Presence) localShard(k localKey) *localShard {
	return &p.local[p.shard(k.topic+"\x00"+k.key)]
}

func (p *Presence) clientShard(c *Client) *clientShard { return &p.clients[c.ID()%presenceShards] }

// errPresenceLimit refuses a join past Limits.MaxPresence.
var errPresenceLimit = errors.New(CodeLimitExceeded)

// join records (c, topic) and, for the user's first connection on this
// instance, writes the entry; the write is returned (nil when nothing was
// written). With checkClosed, a client that disconnected meanwhile is
// undone (its disconnect may have run before the record existed).
func (p *Presence) join(topic string, c *Client, checkClosed bool) (PresenceWrite, error) {
	if err := ValidateTopic(topic); err != nil {
		return nil, err
	}
	if IsReserved(topic) {
		return nil, fmt.Errorf("%w %q: reserved topics have no presence", ErrInvalidTopic, clip(topic))
	}
	k := localKey{topic, p.opts.Key(c)}
	cs := p.clientShard(c)
	cs.mu.Lock()
	ts := cs.m[c]
	if _, dup := ts[topic]; dup {
		cs.mu.Unlock()
		return nil, nil
	}
	if max := p.node.cfg.Limits.MaxPresence; max >= 0 && len(ts) >= max {
		cs.mu.Unlock()
		p.node.metrics.LimitsExceeded.WithLabelValues("presence").Inc()
		return nil, fmt.Errorf("%w: %d presence memberships on one connection", errPresenceLimit, max)
	}
	if ts == nil {
		ts = make(map[string]localKey, 1)
		cs.m[c] = ts
	}
	ts[topic] = k
	ls := p.localShard(k)
	ls.mu.Lock()
	e := ls.entries[k]
	if e == nil {
		e = &lentry{entry: PresenceEntry{Topic: topic, Key: k.key, Instance: p.inst, Data: p.data(c)}}
		ls.entries[k] = e
	}
	e.conns++
	var w PresenceWrite
	if e.conns == 1 {
		w = p.store.Put(e.entry, p.opts.ExpireAfter)
	}
	ls.mu.Unlock()
	cs.mu.Unlock()
	if checkClosed && c.Closed() {
		p.leave(topic, c)
		return nil, ErrClientClosed
	}
	return w, nil
}

// leave drops the (c, topic) record and, for the user's last connection on
// this instance, removes the entry.
func (p *Presence) leave(topic string, c *Client) PresenceWrite {
	cs := p.clientShard(c)
	cs.mu.Lock()
	defer cs.mu.Unlock()
	ts := cs.m[c]
	k, ok := ts[topic]
	if !ok {
		return nil
	}
	delete(ts, topic)
	if len(ts) == 0 {
		delete(cs.m, c)
	}
	return p.release(k)
}

func (p *Presence) leaveAll(c *Client) {
	cs := p.clientShard(c)
	cs.mu.Lock()
	ts := cs.m[c]
	delete(cs.m, c)
	for _, k := range ts {
		p.release(k)
	}
	cs.mu.Unlock()
}

// release drops one connection from a local entry and removes it when it
// was the last. The caller holds the client shard lock; the local shard
// lock orders every write of one entry.
func (p *Presence) release(k localKey) PresenceWrite {
	ls := p.localShard(k)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	e := ls.entries[k]
	if e == nil {
		return nil
	}
	if e.conns--; e.conns > 0 {
		return nil
	}
	delete(ls.entries, k)
	return p.store.Remove(k.topic, k.key, p.inst)
}

func (p *Presence) data(c *Client) json.RawMessage {
	if p.opts.Select == nil {
		return json.RawMessage("null")
	}
	d, err := EncodeData(p.opts.Select(c.UserData()))
	if err != nil {
		p.log.Warn("presence: select returned data that is not JSON", "err", err)
		return json.RawMessage("null")
	}
	return d
}

// PresenceReset implements PresenceWatcher: the view becomes entries, and
// the users that differ from the previous view leave or join.
func (p *Presence) PresenceReset(entries []PresenceEntry) {
	var next [presenceShards]map[string]*vtopic
	for i := range next {
		next[i] = map[string]*vtopic{}
	}
	clear(p.byID)
	for _, e := range entries {
		p.fold(next[p.shard(e.Topic)], e)
	}
	for i := range p.view {
		s := &p.view[i]
		s.mu.Lock()
		old, cur := s.topics, next[i]
		for topic, ot := range old {
			nt := cur[topic]
			for key, u := range ot.users {
				if nt == nil || nt.users[key] == nil {
					p.emit(topic, "leave", PresenceMember{Key: key, Data: u.data})
				}
			}
		}
		for topic, nt := range cur {
			ot := old[topic]
			for key, u := range nt.users {
				if ot == nil || ot.users[key] == nil {
					p.emit(topic, "join", PresenceMember{Key: key, Data: u.data})
				}
			}
		}
		s.topics = cur
		s.mu.Unlock()
	}
}

// PresencePut implements PresenceWatcher: an entry's user joins if it is
// new to the topic.
func (p *Presence) PresencePut(e PresenceEntry) {
	s := p.viewShard(e.Topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.fold(s.topics, e) {
		p.emit(e.Topic, "join", PresenceMember{Key: e.Key, Data: s.topics[e.Topic].users[e.Key].data})
	}
}

// PresenceRemoved implements PresenceWatcher: a user leaves once its last
// entry is gone.
func (p *Presence) PresenceRemoved(id string) {
	ref, ok := p.byID[id]
	if !ok {
		return
	}
	delete(p.byID, id)
	s := p.viewShard(ref.topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.topics[ref.topic]
	if t == nil {
		return
	}
	u := t.users[ref.key]
	if u == nil {
		return
	}
	u.holders = removeString(u.holders, ref.inst)
	if len(u.holders) > 0 {
		return
	}
	delete(t.users, ref.key)
	if len(t.users) == 0 {
		delete(s.topics, ref.topic)
	}
	p.emit(ref.topic, "leave", PresenceMember{Key: ref.key, Data: u.data})
}

// fold adds e to topics and reports whether its user is new to the topic.
func (p *Presence) fold(topics map[string]*vtopic, e PresenceEntry) bool {
	if _, known := p.byID[e.ID]; known {
		return false // a refresh
	}
	p.byID[e.ID] = entryRef{e.Topic, e.Key, e.Instance}
	t := topics[e.Topic]
	if t == nil {
		t = &vtopic{users: map[string]*vuser{}}
		topics[e.Topic] = t
	}
	if u := t.users[e.Key]; u != nil {
		if !hasString(u.holders, e.Instance) {
			u.holders = append(u.holders, e.Instance)
		}
		return false // another instance of a present user
	}
	data := e.Data
	if len(data) == 0 || !json.Valid(data) {
		data = json.RawMessage("null")
	}
	t.users[e.Key] = &vuser{data: data, holders: []string{e.Instance}}
	return true
}

// emit sends a presence event to this instance's subscribers of
// "__presence:"+topic. It runs under the topic's view lock, which orders it
// after the list those subscribers were sent.
func (p *Presence) emit(topic, event string, data any) {
	if _, err := p.node.PublishLocal(PresenceTopicPrefix+topic, event, data); err != nil {
		p.log.Debug("presence: event not sent", "topic", topic, "event", event, "err", err)
	}
}

// sendList sends c the list of t (nil: empty) on presTopic. The caller
// holds t's view lock. The JSON is assembled directly: keys are escaped,
// data is already JSON (checked when folded).
func (p *Presence) sendList(c *Client, presTopic string, t *vtopic) {
	if ValidateTopic(presTopic) != nil {
		return // "__presence:" made a topic of 256 characters too long
	}
	size := 2
	if t != nil {
		for key, u := range t.users {
			size += len(key) + len(u.data) + 24
		}
	}
	data := make([]byte, 0, size)
	data = append(data, '[')
	if t != nil {
		first := true
		for key, u := range t.users {
			if !first {
				data = append(data, ',')
			}
			first = false
			data = append(data, `{"key":`...)
			data = appendJSONString(data, key)
			data = append(data, `,"data":`...)
			data = append(data, u.data...)
			data = append(data, '}')
		}
	}
	data = append(data, ']')
	p.node.SendEnvelope([]*Client{c}, presTopic, Envelope(presTopic, "list", data))
}

func members(t *vtopic) []PresenceMember {
	if t == nil {
		return []PresenceMember{}
	}
	out := make([]PresenceMember, 0, len(t.users))
	for key, u := range t.users {
		out = append(out, PresenceMember{Key: key, Data: u.data})
	}
	return out
}

// heartbeat refreshes this instance's entries and sends "heartbeat" events
// (the present keys) to local presence subscribers, every HeartbeatInterval.
func (p *Presence) heartbeat() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		for i := range p.local {
			ls := &p.local[i]
			ls.mu.Lock()
			for _, e := range ls.entries {
				p.store.Put(e.entry, p.opts.ExpireAfter)
			}
			ls.mu.Unlock()
		}
		p.node.Topics(func(topic string, _ int) {
			inner, ok := strings.CutPrefix(topic, PresenceTopicPrefix)
			if !ok {
				return
			}
			s := p.viewShard(inner)
			s.mu.Lock()
			keys := []string{}
			if vt := s.topics[inner]; vt != nil {
				keys = make([]string, 0, len(vt.users))
				for key := range vt.users {
					keys = append(keys, key)
				}
			}
			p.emit(inner, "heartbeat", keys)
			s.mu.Unlock()
		})
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
	_ Observer        = (*Presence)(nil)
	_ PresenceWatcher = (*Presence)(nil)
)
