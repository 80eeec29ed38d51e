package jetstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
)

// ErrPartialCluster is fabric.ErrPartialCluster: it is wrapped when not
// every known instance answered in time; the result then covers those that
// did.
var ErrPartialCluster = fabric.ErrPartialCluster

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
	// UserKey returns the user a connection belongs to, for SendToUser,
	// Disconnect and Unsubscribe; anonymous connections (ok false) are not
	// addressable. Default: fabric.UserKey of the connection's user data.
	UserKey func(c *fabric.Client) (key string, ok bool)
	// Name is this instance's name in Info (default: the host name).
	Name string
	// Version is the Fabric version this instance reports in Info
	// (default: the module version from the build information).
	Version string
	// Logger receives warnings; nil uses the node's logger.
	Logger *slog.Logger
}

// Cluster answers cluster-wide questions on core NATS: connection and
// subscriber counts, topic lists and instance descriptions by scatter-gather
// over every instance, direct messages to a user's connections wherever
// they are, and disconnecting or unsubscribing a user everywhere.
//
// Each instance announces itself on "<prefix>.sys.hb" every heartbeat, so
// every instance knows how many answers a call needs; counts are requests
// on "<prefix>.sys.count" that every instance answers with its local
// figures, and the other calls (Channels, Info, Disconnect, Unsubscribe)
// requests on "<prefix>.sys.admin" that every instance answers likewise
// after acting on its own connections. An instance that does not know
// "<prefix>.sys.admin" (an older version) does not answer, which the caller
// sees as a partial answer. Each instance subscribes to "<prefix>.u.<user>"
// while it has at least one connection of that user, so SendToUser costs
// one publish and reaches only the instances that host the user; it also
// finds the user's local connections for Disconnect and Unsubscribe.
type Cluster struct {
	node *fabric.Node
	nc   *nats.Conn
	opts ClusterOptions
	log  *slog.Logger
	id   string
	seed maphash.Seed

	hbSubject, countSubject, adminSubject, userPrefix string
	started                                           time.Time

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

// countRequest is a request on the count subject (Op "") or the admin
// subject (Op one of the op* constants).
type countRequest struct {
	Op      string `json:"op,omitempty"`
	Topic   string `json:"topic,omitempty"`
	User    string `json:"user,omitempty"`
	Code    int    `json:"code,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Pattern string `json:"pattern,omitempty"`
	Limit   int    `json:"limit,omitempty"`
}

// Admin operations.
const (
	opChannels    = "channels"
	opInfo        = "info"
	opDisconnect  = "disconnect"
	opUnsubscribe = "unsubscribe"
)

type countReply struct {
	ID          string `json:"id"`
	Connections int    `json:"connections"`
	Subscribers int    `json:"subscribers"`
	// Affected is how many connections a Disconnect or Unsubscribe acted on.
	Affected int `json:"affected,omitempty"`
	// Channels are the first matching topics in byte order, with their
	// local subscriber counts; Truncated says more matched.
	Channels  []channelCount       `json:"channels,omitempty"`
	Truncated bool                 `json:"truncated,omitempty"`
	Info      *fabric.InstanceInfo `json:"info,omitempty"`
}

// channelCount is one topic of a channels reply.
type channelCount struct {
	T string `json:"t"`
	N int    `json:"n"`
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
	if opts.Name == "" {
		opts.Name, _ = os.Hostname()
	}
	if opts.Version == "" {
		opts.Version = moduleVersion()
	}
	cl := &Cluster{
		node: node, nc: nc, opts: opts, log: opts.Logger, id: node.ID(), seed: maphash.MakeSeed(),
		hbSubject:    opts.Prefix + ".sys.hb",
		countSubject: opts.Prefix + ".sys.count",
		adminSubject: opts.Prefix + ".sys.admin",
		userPrefix:   opts.Prefix + ".u.",
		started:      time.Now(),
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
	adm, err := nc.Subscribe(cl.adminSubject, cl.onAdmin)
	if err != nil {
		_ = hb.Unsubscribe()
		_ = cnt.Unsubscribe()
		cl.Close()
		return nil, fmt.Errorf("jetstream: cluster: subscribe %s: %w", cl.adminSubject, err)
	}
	cl.respPrefix = nc.NewInbox() + "."
	resp, err := nc.Subscribe(cl.respPrefix+"*", cl.onReply)
	if err != nil {
		_ = hb.Unsubscribe()
		_ = cnt.Unsubscribe()
		_ = adm.Unsubscribe()
		cl.Close()
		return nil, fmt.Errorf("jetstream: cluster: subscribe replies: %w", err)
	}
	cl.sysSub = []*nats.Subscription{hb, cnt, adm, resp}
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
	replies, err := cl.gather(ctx, cl.countSubject, countRequest{})
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
	replies, err := cl.gather(ctx, cl.countSubject, countRequest{Topic: topic})
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

// Channels implements fabric.ClusterView: every instance answers with its
// first matching topics in byte order, at most limit and at most what fits
// in one NATS message; the merge keeps the topics up to the smallest last
// topic of the instances that cut their list, so every count is complete
// (see Connections for partial answers).
func (cl *Cluster) Channels(ctx context.Context, pattern string, limit int) (map[string]int, bool, error) {
	limit = channelsLimit(limit)
	replies, err := cl.gather(ctx, cl.adminSubject, countRequest{Op: opChannels, Pattern: pattern, Limit: limit})
	counts := map[string]int{}
	cut, hasCut := "", false
	for _, r := range replies {
		for _, c := range r.Channels {
			counts[c.T] += c.N
		}
		if r.Truncated {
			last := ""
			if len(r.Channels) > 0 {
				last = r.Channels[len(r.Channels)-1].T
			}
			if !hasCut || last < cut {
				cut, hasCut = last, true
			}
		}
	}
	out, truncated := firstChannels(counts, cut, hasCut, limit)
	return out, truncated, err
}

// Info implements fabric.ClusterView: one description per instance that
// answered (see Connections for partial answers), sorted by ID. Uptime is
// the time since the instance's Cluster started.
func (cl *Cluster) Info(ctx context.Context) ([]fabric.InstanceInfo, error) {
	replies, err := cl.gather(ctx, cl.adminSubject, countRequest{Op: opInfo})
	out := make([]fabric.InstanceInfo, 0, len(replies))
	for _, r := range replies {
		if r.Info != nil {
			out = append(out, *r.Info)
		}
	}
	slices.SortFunc(out, func(a, b fabric.InstanceInfo) int { return strings.Compare(a.ID, b.ID) })
	return out, err
}

// Disconnect implements fabric.ClusterView: every instance closes its
// connections of userID and answers how many (see Connections for partial
// answers).
func (cl *Cluster) Disconnect(ctx context.Context, userID string, code int, reason string) (int, error) {
	if userID == "" {
		return 0, errors.New("jetstream: Disconnect: empty user id")
	}
	return cl.act(ctx, "Disconnect", countRequest{Op: opDisconnect, User: userID, Code: code, Reason: reason})
}

// Unsubscribe implements fabric.ClusterView: every instance unsubscribes
// its connections of userID from topic and answers how many were
// subscribed (see Connections for partial answers).
func (cl *Cluster) Unsubscribe(ctx context.Context, userID, topic string) (int, error) {
	if userID == "" {
		return 0, errors.New("jetstream: Unsubscribe: empty user id")
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	return cl.act(ctx, "Unsubscribe", countRequest{Op: opUnsubscribe, User: userID, Topic: topic})
}

// act runs an admin request that acts on a user's connections and sums
// the answers.
func (cl *Cluster) act(ctx context.Context, what string, req countRequest) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("jetstream: %s: %w", what, err)
	}
	replies, err := cl.gather(ctx, cl.adminSubject, req)
	n := 0
	for _, r := range replies {
		n += r.Affected
	}
	return n, err
}

// gather sends one request on subject and collects an answer from every
// known instance, or as many as arrive before the deadline.
func (cl *Cluster) gather(ctx context.Context, subject string, req countRequest) ([]countReply, error) {
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
	what := req.Op
	if what == "" {
		what = "count"
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("jetstream: cluster %s: %w", what, err)
	}
	if err := cl.nc.PublishRequest(subject, cl.respPrefix+token, body); err != nil {
		return nil, fmt.Errorf("jetstream: cluster %s: %w", what, err)
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
			return replies, fmt.Errorf("jetstream: cluster %s: %w: %d of %d instances answered (%v)", what, ErrPartialCluster, len(seen), want, ctx.Err())
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

// onAdmin answers an admin request with what this instance has and did.
func (cl *Cluster) onAdmin(m *nats.Msg) {
	var req countRequest
	if json.Unmarshal(m.Data, &req) != nil {
		return
	}
	r := countReply{ID: cl.id, Connections: cl.node.Connections()}
	switch req.Op {
	case opChannels:
		budget := int(cl.nc.MaxPayload()) - 1024
		r.Channels, r.Truncated = localChannels(cl.node, req.Pattern, channelsLimit(req.Limit), budget)
	case opInfo:
		info := fabric.InstanceInfo{ID: cl.id, Name: cl.opts.Name, Version: cl.opts.Version,
			Connections: r.Connections, Uptime: time.Since(cl.started)}
		cl.node.Topics(func(_ string, n int) {
			info.Topics++
			info.Subscriptions += n
		})
		r.Info = &info
	case opDisconnect:
		for _, c := range cl.localClients(req.User) {
			if !c.Closed() {
				c.Close(req.Code, req.Reason)
				r.Affected++
			}
		}
	case opUnsubscribe:
		for _, c := range cl.localClients(req.User) {
			if c.Subscribed(req.Topic) {
				cl.node.Unsubscribe(c, req.Topic)
				r.Affected++
			}
		}
	default:
		return // an operation of a later version: no answer, the caller sees a partial one
	}
	b, err := json.Marshal(r)
	if err != nil {
		cl.log.Warn("cluster: encode admin reply failed", "op", req.Op, "err", err)
		return
	}
	if err := m.Respond(b); err != nil {
		cl.log.Debug("cluster: admin reply failed", "op", req.Op, "err", err)
	}
}

// localClients returns this instance's connections of user (a snapshot).
func (cl *Cluster) localClients(user string) []*fabric.Client {
	if user == "" {
		return nil
	}
	s := cl.userShard(user)
	s.mu.Lock()
	defer s.mu.Unlock()
	if u := s.users[user]; u != nil {
		return u.clients // replaced, never modified
	}
	return nil
}

// channelsLimit applies the bounds of fabric.ClusterView.Channels.
func channelsLimit(limit int) int {
	if limit <= 0 {
		return fabric.DefaultChannelsLimit
	}
	return min(limit, fabric.MaxChannelsLimit)
}

// localChannels returns node's topics matching pattern, the first limit in
// byte order, as many as fit in budget bytes of JSON; truncated reports
// that more matched.
func localChannels(node *fabric.Node, pattern string, limit, budget int) ([]channelCount, bool) {
	match := func(string) bool { return true }
	if pattern != "" {
		match = fabric.MatchTopics([]string{pattern})
	}
	var all []channelCount
	node.Topics(func(t string, n int) {
		if match(t) {
			all = append(all, channelCount{T: t, N: n})
		}
	})
	slices.SortFunc(all, func(a, b channelCount) int { return strings.Compare(a.T, b.T) })
	truncated := false
	if len(all) > limit {
		all, truncated = all[:limit], true
	}
	size := 0
	for i, c := range all {
		// Topics hold no character JSON escapes: {"t":"…","n":N}, plus a comma.
		size += len(c.T) + 14 + 20
		if size > budget {
			return all[:i], true
		}
	}
	return all, truncated
}

// firstChannels returns the topics of counts up to cut (all of them
// without one), the first limit of them in byte order, and whether any
// were left out.
func firstChannels(counts map[string]int, cut string, hasCut bool, limit int) (map[string]int, bool) {
	keys := make([]string, 0, len(counts))
	for t := range counts {
		if !hasCut || t <= cut {
			keys = append(keys, t)
		}
	}
	truncated := hasCut
	if len(keys) > limit {
		slices.Sort(keys)
		keys, truncated = keys[:limit], true
	}
	out := make(map[string]int, len(keys))
	for _, t := range keys {
		out[t] = counts[t]
	}
	return out, truncated
}

// moduleVersion returns the version of the Fabric module in this binary's
// build information, or "".
func moduleVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	const path = "github.com/fabricrt/fabric"
	if bi.Main.Path == path {
		if v := bi.Main.Version; v != "(devel)" {
			return v
		}
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == path {
			return d.Version
		}
	}
	return ""
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
