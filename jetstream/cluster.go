package jetstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
)

// ErrPartialCluster is wrapped when not every known instance answered a
// cluster-wide count in time; the count returned is then the sum of those
// that did.
var ErrPartialCluster = errors.New("not every instance answered")

// ClusterOptions configures NewCluster. The zero value has the defaults.
type ClusterOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric").
	Prefix string
	// HeartbeatInterval is how often each instance announces itself
	// (default 5s).
	HeartbeatInterval time.Duration
	// ExpireAfter is how long an instance that stopped announcing itself
	// still counts as a member (default three heartbeats).
	ExpireAfter time.Duration
	// Timeout bounds a count when the caller's context has no deadline
	// (default 2s).
	Timeout time.Duration
	// DiscoveryWait is how long NewCluster listens for the other instances
	// before returning (default 200ms).
	DiscoveryWait time.Duration
	// UserKey returns the user a connection belongs to, for SendToUser;
	// anonymous connections (ok false) are not addressable. Default:
	// fabric.UserKey of the connection's user data.
	UserKey func(c *fabric.Client) (key string, ok bool)
	// Logger receives warnings; nil uses the node's logger.
	Logger *slog.Logger
}

// Cluster answers cluster-wide questions on core NATS: connection and
// subscriber counts by scatter-gather over every instance, and direct
// messages to a user's connections wherever they are.
//
// Each instance announces itself on "<prefix>.sys.hb" every heartbeat, so
// every instance knows how many answers a count needs; counts are requests
// on "<prefix>.sys.count" that every instance answers with its local
// figures. Each instance subscribes to "<prefix>.u.<user>" while it has at
// least one connection of that user, so SendToUser costs one publish and
// reaches only the instances that host the user.
type Cluster struct {
	node *fabric.Node
	nc   *nats.Conn
	opts ClusterOptions
	log  *slog.Logger
	id   string
	seed maphash.Seed

	hbSubject, countSubject, userPrefix string

	membersMu sync.Mutex
	members   map[string]time.Time // instance id → last heard

	users  [clusterShards]userShard
	shards []chan *nats.Msg

	// Replies to this instance's counts arrive on one wildcard inbox
	// subscription and are routed to the waiting call by the last token.
	respPrefix string
	respMu     sync.Mutex
	pending    map[string]chan countReply
	nextReq    atomic.Uint64

	subs   sync.Map // *nats.Subscription → *userEntry
	sysSub []*nats.Subscription

	removeObs func()
	stop      chan struct{}
	wg        sync.WaitGroup
	closed    atomic.Bool
	closeOnce sync.Once
}

const clusterShards = 64

type userShard struct {
	mu    sync.Mutex
	users map[string]*userEntry
}

// userEntry is one user's local connections and the subscription that
// feeds them while there are any.
type userEntry struct {
	key     string
	clients []*fabric.Client // guarded by the shard lock; replaced, never modified
	sub     *nats.Subscription
}

// announce is the body of a heartbeat: op is "hello" (a new instance asks
// everyone to announce themselves), "hb" or "bye".
type announce struct {
	ID string `json:"id"`
	Op string `json:"op"`
}

type countRequest struct {
	Topic string `json:"topic,omitempty"`
}

type countReply struct {
	ID          string `json:"id"`
	Connections int    `json:"connections"`
	Subscribers int    `json:"subscribers"`
}

// NewCluster starts answering cluster-wide counts and user messages for
// node on nc, and listens for the other instances for DiscoveryWait. Close
// stops it.
func NewCluster(ctx context.Context, node *fabric.Node, nc *nats.Conn, opts ClusterOptions) (*Cluster, error) {
	if node == nil || nc == nil {
		return nil, errors.New("jetstream: cluster needs a node and a NATS connection")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.HeartbeatInterval <= 0 {
		opts.HeartbeatInterval = 5 * time.Second
	}
	if opts.ExpireAfter <= 0 {
		opts.ExpireAfter = 3 * opts.HeartbeatInterval
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Second
	}
	if opts.DiscoveryWait <= 0 {
		opts.DiscoveryWait = 200 * time.Millisecond
	}
	if opts.UserKey == nil {
		opts.UserKey = func(c *fabric.Client) (string, bool) { return fabric.UserKey(c.UserData()) }
	}
	cl := &Cluster{
		node: node, nc: nc, opts: opts, log: opts.Logger, id: node.ID(), seed: maphash.MakeSeed(),
		hbSubject:    opts.Prefix + ".sys.hb",
		countSubject: opts.Prefix + ".sys.count",
		userPrefix:   opts.Prefix + ".u.",
		members:      map[string]time.Time{},
		pending:      map[string]chan countReply{},
		stop:         make(chan struct{}),
	}
	if cl.log == nil {
		cl.log = node.Logger()
	}
	for i := range cl.users {
		cl.users[i].users = map[string]*userEntry{}
	}
	for range runtime.GOMAXPROCS(0) {
		ch := make(chan *nats.Msg, 1<<14)
		cl.shards = append(cl.shards, ch)
		cl.wg.Add(1)
		go cl.deliver(ch)
	}
	hb, err := nc.Subscribe(cl.hbSubject, cl.onAnnounce)
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("jetstream: cluster: subscribe %s: %w", cl.hbSubject, err)
	}
	cnt, err := nc.Subscribe(cl.countSubject, cl.onCount)
	if err != nil {
		_ = hb.Unsubscribe()
		cl.Close()
		return nil, fmt.Errorf("jetstream: cluster: subscribe %s: %w", cl.countSubject, err)
	}
	cl.respPrefix = nc.NewInbox() + "."
	resp, err := nc.Subscribe(cl.respPrefix+"*", cl.onReply)
	if err != nil {
		_ = hb.Unsubscribe()
		_ = cnt.Unsubscribe()
		cl.Close()
		return nil, fmt.Errorf("jetstream: cluster: subscribe replies: %w", err)
	}
	cl.sysSub = []*nats.Subscription{hb, cnt, resp}
	cl.removeObs = node.Observe(cl)
	cl.announce("hello")
	cl.wg.Add(1)
	go cl.heartbeat()
	select {
	case <-time.After(opts.DiscoveryWait):
	case <-ctx.Done():
	}
	return cl, nil
}

// ID returns this instance's id (the node's).
func (cl *Cluster) ID() string { return cl.id }

// Members returns the number of instances currently known, this one included.
func (cl *Cluster) Members() int {
	cl.membersMu.Lock()
	defer cl.membersMu.Unlock()
	n := 1
	cutoff := time.Now().Add(-cl.opts.ExpireAfter)
	for id, at := range cl.members {
		if id != cl.id && at.After(cutoff) {
			n++
		}
	}
	return n
}

// Connections returns the number of connections on every instance. With a
// non-nil error wrapping ErrPartialCluster the count covers only the
// instances that answered before ctx (or Options.Timeout) ended.
func (cl *Cluster) Connections(ctx context.Context) (int, error) {
	replies, err := cl.gather(ctx, countRequest{})
	n := 0
	for _, r := range replies {
		n += r.Connections
	}
	return n, err
}

// Subscribers returns the number of subscribers of topic on every instance
// (see Connections for partial answers).
func (cl *Cluster) Subscribers(ctx context.Context, topic string) (int, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	replies, err := cl.gather(ctx, countRequest{Topic: topic})
	n := 0
	for _, r := range replies {
		n += r.Subscribers
	}
	return n, err
}

// SendToUser delivers {topic, event, data} to every connection of userID on
// every instance, in the order of the calls. The envelope is encoded once
// and published once; only instances hosting the user receive it. Like a
// publish, it succeeds when nobody is connected.
func (cl *Cluster) SendToUser(ctx context.Context, userID, topic, event string, data any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if userID == "" {
		return errors.New("jetstream: SendToUser: empty user id")
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return err
	}
	if err := fabric.ValidateEvent(event); err != nil {
		return err
	}
	d, err := fabric.EncodeData(data)
	if err != nil {
		return err
	}
	if err := cl.nc.Publish(cl.userPrefix+kvToken(userID), fabric.Envelope(topic, event, d)); err != nil {
		return fmt.Errorf("jetstream: SendToUser %q: %w", userID, err)
	}
	return nil
}

// gather sends one count request and collects an answer from every known
// instance, or as many as arrive before the deadline.
func (cl *Cluster) gather(ctx context.Context, req countRequest) ([]countReply, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cl.opts.Timeout)
		defer cancel()
	}
	want := cl.Members()
	token := strconv.FormatUint(cl.nextReq.Add(1), 36)
	ch := make(chan countReply, want+4)
	cl.respMu.Lock()
	cl.pending[token] = ch
	cl.respMu.Unlock()
	defer func() {
		cl.respMu.Lock()
		delete(cl.pending, token)
		cl.respMu.Unlock()
	}()
	body, _ := json.Marshal(req)
	if err := cl.nc.PublishRequest(cl.countSubject, cl.respPrefix+token, body); err != nil {
		return nil, fmt.Errorf("jetstream: cluster count: %w", err)
	}
	replies := make([]countReply, 0, want)
	seen := make(map[string]bool, want)
	for len(seen) < want {
		select {
		case r := <-ch:
			if seen[r.ID] {
				continue
			}
			seen[r.ID] = true
			replies = append(replies, r)
			cl.heard(r.ID)
		case <-ctx.Done():
			return replies, fmt.Errorf("jetstream: cluster count: %w: %d of %d instances answered (%v)", ErrPartialCluster, len(seen), want, ctx.Err())
		}
	}
	return replies, nil
}

// onReply routes one answer to the count waiting for it.
func (cl *Cluster) onReply(m *nats.Msg) {
	token := m.Subject[len(cl.respPrefix):]
	var r countReply
	if json.Unmarshal(m.Data, &r) != nil || r.ID == "" {
		return
	}
	cl.respMu.Lock()
	ch := cl.pending[token]
	cl.respMu.Unlock()
	if ch != nil {
		select {
		case ch <- r:
		default: // more answers than expected (an instance unknown so far): drop
		}
	}
}

func (cl *Cluster) onCount(m *nats.Msg) {
	var req countRequest
	if len(m.Data) > 0 && json.Unmarshal(m.Data, &req) != nil {
		return
	}
	r := countReply{ID: cl.id, Connections: cl.node.Connections()}
	if req.Topic != "" {
		r.Subscribers = cl.node.Subscribers(req.Topic)
	}
	b, _ := json.Marshal(r)
	if err := m.Respond(b); err != nil {
		cl.log.Debug("cluster: count reply failed", "err", err)
	}
}

func (cl *Cluster) onAnnounce(m *nats.Msg) {
	var a announce
	if json.Unmarshal(m.Data, &a) != nil || a.ID == "" || a.ID == cl.id {
		return
	}
	switch a.Op {
	case "bye":
		cl.membersMu.Lock()
		delete(cl.members, a.ID)
		cl.membersMu.Unlock()
	case "hello":
		cl.heard(a.ID)
		cl.announce("hb")
	default:
		cl.heard(a.ID)
	}
}

func (cl *Cluster) heard(id string) {
	if id == cl.id {
		return
	}
	cl.membersMu.Lock()
	cl.members[id] = time.Now()
	cl.membersMu.Unlock()
}

func (cl *Cluster) announce(op string) {
	b, _ := json.Marshal(announce{ID: cl.id, Op: op})
	if err := cl.nc.Publish(cl.hbSubject, b); err != nil {
		logFailure(cl.log, "cluster: announce failed", err)
	}
}

// heartbeat announces this instance and forgets silent ones.
func (cl *Cluster) heartbeat() {
	defer cl.wg.Done()
	t := time.NewTicker(cl.opts.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-cl.stop:
			return
		case now := <-t.C:
			cl.announce("hb")
			cutoff := now.Add(-cl.opts.ExpireAfter)
			cl.membersMu.Lock()
			for id, at := range cl.members {
				if at.Before(cutoff) {
					delete(cl.members, id)
				}
			}
			cl.membersMu.Unlock()
		}
	}
}

func (cl *Cluster) userShard(key string) *userShard {
	return &cl.users[maphash.String(cl.seed, key)%clusterShards]
}

// Connected implements fabric.Observer: the first connection of a user on
// this instance subscribes to the user's subject.
func (cl *Cluster) Connected(c *fabric.Client) {
	key, ok := cl.opts.UserKey(c)
	if !ok || cl.closed.Load() {
		return
	}
	s := cl.userShard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[key]
	if u == nil {
		u = &userEntry{key: key}
		ch := cl.shards[maphash.String(cl.seed, key)%uint64(len(cl.shards))]
		sub, err := cl.nc.ChanSubscribe(cl.userPrefix+kvToken(key), ch)
		if err != nil {
			logFailure(cl.log, "cluster: subscribe for a user failed", err, "user", key)
			return
		}
		u.sub = sub
		cl.subs.Store(sub, u)
		s.users[key] = u
	}
	next := make([]*fabric.Client, len(u.clients), len(u.clients)+1)
	copy(next, u.clients)
	u.clients = append(next, c)
}

// Subscribed implements fabric.Observer (nothing to do).
func (cl *Cluster) Subscribed(*fabric.Client, string) {}

// Unsubscribed implements fabric.Observer (nothing to do).
func (cl *Cluster) Unsubscribed(*fabric.Client, string) {}

// Disconnected implements fabric.Observer: the last connection of a user on
// this instance drops the user's subscription.
func (cl *Cluster) Disconnected(c *fabric.Client) {
	key, ok := cl.opts.UserKey(c)
	if !ok {
		return
	}
	s := cl.userShard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[key]
	if u == nil {
		return
	}
	next := make([]*fabric.Client, 0, len(u.clients))
	for _, x := range u.clients {
		if x != c {
			next = append(next, x)
		}
	}
	u.clients = next
	if len(next) == 0 {
		delete(s.users, key)
		cl.subs.Delete(u.sub)
		if err := u.sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			cl.log.Debug("cluster: unsubscribe for a user failed", "user", key, "err", err)
		}
	}
}

// deliver hands user messages of one shard to the user's local
// connections, in arrival order.
func (cl *Cluster) deliver(ch chan *nats.Msg) {
	defer cl.wg.Done()
	for {
		select {
		case <-cl.stop:
			return
		case m := <-ch:
			v, ok := cl.subs.Load(m.Sub)
			if !ok {
				continue // the user's last connection left meanwhile
			}
			u := v.(*userEntry)
			s := cl.userShard(u.key)
			s.mu.Lock()
			to := u.clients
			s.mu.Unlock()
			topic, _, _, ok := fabric.SplitEnvelope(m.Data)
			if !ok {
				continue
			}
			cl.node.SendEnvelope(to, string(topic), m.Data)
		}
	}
}

// Close says goodbye to the other instances and stops answering.
func (cl *Cluster) Close() error {
	cl.closeOnce.Do(func() {
		cl.closed.Store(true)
		if cl.removeObs != nil {
			cl.removeObs()
		}
		for _, s := range cl.sysSub {
			_ = s.Unsubscribe()
		}
		if len(cl.sysSub) > 0 {
			cl.announce("bye")
		}
		for i := range cl.users {
			s := &cl.users[i]
			s.mu.Lock()
			for k, u := range s.users {
				_ = u.sub.Unsubscribe()
				cl.subs.Delete(u.sub)
				delete(s.users, k)
			}
			s.mu.Unlock()
		}
		close(cl.stop)
		cl.wg.Wait()
	})
	return nil
}

var (
	_ fabric.ClusterView = (*Cluster)(nil)
	_ fabric.Observer    = (*Cluster)(nil)
)
