package redis

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
)

// ErrPartialCluster is fabric.ErrPartialCluster: it is wrapped when not
// every known instance answered in time; the result then covers those that
// did.
var ErrPartialCluster = fabric.ErrPartialCluster

// Bounds of the cluster view.
const (
	// clusterShards spreads the local users over locks.
	clusterShards = 64
	// requestQueue bounds the requests waiting to be answered here; past
	// it a request gets no answer (the asker sees a partial one).
	requestQueue = 1024
	// userQueue bounds the messages to users waiting per delivery
	// goroutine; past it they are dropped.
	userQueue = 1 << 14
	// maxReplyBytes bounds the topics one Channels answer carries.
	maxReplyBytes = 1 << 20
	// maxMembers bounds the instances known.
	maxMembers = 4096
)

// ClusterOptions configures Backend.Cluster. The zero value has the
// defaults.
type ClusterOptions struct {
	// HeartbeatInterval is how often each instance announces itself
	// (default 5s).
	HeartbeatInterval time.Duration
	// ExpireAfter is how long an instance that stopped announcing itself
	// still counts as a member (default three heartbeats).
	ExpireAfter time.Duration
	// Timeout bounds a call when the caller's context has no deadline
	// (default 2s).
	Timeout time.Duration
	// DiscoveryWait is how long Cluster listens for the other instances
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

// Cluster is fabric.ClusterView on Redis pub/sub, the scatter-gather of
// jetstream.Cluster: each instance announces itself on
// "<prefix>:{0}:sys:hb" every heartbeat, so that every instance knows how
// many answers a call needs; a call publishes a request on
// "<prefix>:{0}:sys:req" that every instance answers (after acting on its
// own connections, for Disconnect and Unsubscribe) on the asker's reply
// channel "<prefix>:{P}:sys:r:<id>". Each instance subscribes to
// "<prefix>:{P}:u:<user>" while it has a connection of that user, so
// SendToUser is one publish that reaches only the instances hosting the
// user.
type Cluster struct {
	b    *Backend
	node *fabric.Node
	opts ClusterOptions
	log  *slog.Logger
	id   string
	seed maphash.Seed

	hbChannel, reqChannel, replyChannel string
	started                             time.Time

	membersMu sync.Mutex
	members   map[string]time.Time

	users    [clusterShards]userShard
	userChs  []chan userMsg
	requests chan clusterRequest
	hello    chan struct{}

	respMu  sync.Mutex
	pending map[string]chan clusterReply
	nextReq atomic.Uint64

	sys       []sysSub
	removeObs func()
	stop      chan struct{}
	wg        sync.WaitGroup
	closed    atomic.Bool
	closeOnce sync.Once
}

// sysSub is one of the cluster's own channels and its handler.
type sysSub struct {
	ch string
	h  psHandler
}

type userShard struct {
	mu    sync.Mutex
	users map[string]*userEntry
}

// userEntry is one user's local connections and the handler of the
// user's channel while there are any.
type userEntry struct {
	cl      *Cluster
	key     string
	channel string
	clients []*fabric.Client // replaced, never modified; under the shard lock
}

type userMsg struct {
	u   *userEntry
	env string
}

// onMessage implements psHandler for a user's channel.
func (u *userEntry) onMessage(payload string) {
	cl := u.cl
	ch := cl.userChs[maphash.String(cl.seed, u.key)%uint64(len(cl.userChs))]
	select {
	case ch <- userMsg{u: u, env: payload}:
	default:
		cl.log.Warn("cluster: a message to a user was dropped: delivery queue full", "user", u.key)
	}
}

// announce is a heartbeat: op "hello" (a new instance asks everyone to
// announce themselves), "hb" or "bye".
type announce struct {
	ID string `json:"id"`
	Op string `json:"op"`
}

// clusterRequest is a call every instance answers on Reply.
type clusterRequest struct {
	Op      string `json:"op"`
	Reply   string `json:"reply"`
	Token   string `json:"token"`
	Topic   string `json:"topic,omitempty"`
	User    string `json:"user,omitempty"`
	Code    int    `json:"code,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Pattern string `json:"pattern,omitempty"`
	Limit   int    `json:"limit,omitempty"`
}

// Operations of a request.
const (
	opCount       = "count"
	opChannels    = "channels"
	opInfo        = "info"
	opDisconnect  = "disconnect"
	opUnsubscribe = "unsubscribe"
)

type clusterReply struct {
	Token       string               `json:"token"`
	ID          string               `json:"id"`
	Connections int                  `json:"connections"`
	Subscribers int                  `json:"subscribers,omitempty"`
	Affected    int                  `json:"affected,omitempty"`
	Channels    []channelCount       `json:"channels,omitempty"`
	Truncated   bool                 `json:"truncated,omitempty"`
	Info        *fabric.InstanceInfo `json:"info,omitempty"`
}

type channelCount struct {
	T string `json:"t"`
	N int    `json:"n"`
}

// handlerFunc adapts a function to psHandler.
type handlerFunc func(payload string)

func (f *handlerFunc) onMessage(payload string) { (*f)(payload) }

// Cluster starts answering cluster-wide calls for node (one per Node), and
// listens for the other instances for DiscoveryWait (or until ctx ends).
// Close stops it; the backend's Close does too.
func (b *Backend) Cluster(ctx context.Context, node *fabric.Node, opts ClusterOptions) (*Cluster, error) {
	if node == nil {
		return nil, errors.New("redis: cluster needs a node")
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
		b: b, node: node, opts: opts, log: opts.Logger, id: node.ID(), seed: maphash.MakeSeed(),
		hbChannel:    b.key(0, "sys", "hb"),
		reqChannel:   b.key(0, "sys", "req"),
		replyChannel: b.key(b.partition(node.ID()), "sys", "r:"+node.ID()),
		started:      time.Now(),
		members:      map[string]time.Time{},
		requests:     make(chan clusterRequest, requestQueue),
		hello:        make(chan struct{}, 1),
		pending:      map[string]chan clusterReply{},
		stop:         make(chan struct{}),
	}
	if cl.log == nil {
		cl.log = node.Logger()
	}
	for i := range cl.users {
		cl.users[i].users = map[string]*userEntry{}
	}
	for range runtime.GOMAXPROCS(0) {
		ch := make(chan userMsg, userQueue)
		cl.userChs = append(cl.userChs, ch)
		cl.wg.Add(1)
		go cl.deliver(ch)
	}
	cl.wg.Add(2)
	go cl.serve()
	go cl.heartbeat()
	if !b.onClose(func() { _ = cl.Close() }) {
		_ = cl.Close()
		return nil, fmt.Errorf("redis: cluster: %w", ErrClosed)
	}
	hb, req, rep := handlerFunc(cl.onAnnounce), handlerFunc(cl.onRequest), handlerFunc(cl.onReply)
	cl.sys = []sysSub{{cl.hbChannel, &hb}, {cl.reqChannel, &req}, {cl.replyChannel, &rep}}
	sctx, cancel := context.WithTimeout(ctx, b.opts.Timeout)
	defer cancel()
	for _, s := range cl.sys {
		if err := b.ps.subscribe(sctx, s.ch, s.h, true); err != nil {
			_ = cl.Close()
			return nil, fmt.Errorf("redis: cluster: subscribe %s: %w", s.ch, unavailable(err))
		}
	}
	cl.removeObs = node.Observe(cl)
	cl.announce("hello")
	select {
	case <-time.After(opts.DiscoveryWait):
	case <-ctx.Done():
	}
	return cl, nil
}

// ID returns this instance's id (the node's).
func (cl *Cluster) ID() string { return cl.id }

// Members returns the number of instances currently known, this one
// included.
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

// Connections implements fabric.ClusterView. With an error wrapping
// ErrPartialCluster the count covers the instances that answered in time.
func (cl *Cluster) Connections(ctx context.Context) (int, error) {
	replies, err := cl.gather(ctx, clusterRequest{Op: opCount})
	n := 0
	for _, r := range replies {
		n += r.Connections
	}
	return n, err
}

// Subscribers implements fabric.ClusterView (see Connections for partial
// answers).
func (cl *Cluster) Subscribers(ctx context.Context, topic string) (int, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	replies, err := cl.gather(ctx, clusterRequest{Op: opCount, Topic: topic})
	n := 0
	for _, r := range replies {
		n += r.Subscribers
	}
	return n, err
}

// SendToUser implements fabric.ClusterView: the envelope is encoded once
// and published once on the user's channel; only instances hosting the
// user receive it. Like a publish, it succeeds when nobody is connected.
func (cl *Cluster) SendToUser(ctx context.Context, userID, topic, event string, data any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if userID == "" {
		return errors.New("redis: SendToUser: empty user id")
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
	return cl.b.publish(ctx, "SendToUser "+strconv.Quote(clip(userID)), cl.userChannel(userID), string(fabric.Envelope(topic, event, d)))
}

func (cl *Cluster) userChannel(user string) string {
	return cl.b.key(cl.b.partition(user), "u", user)
}

// Channels implements fabric.ClusterView: every instance answers with its
// first matching topics in byte order (at most limit, and at most 1 MiB of
// them); the merge keeps the topics up to the smallest last topic of the
// instances that cut their list, so every count is complete.
func (cl *Cluster) Channels(ctx context.Context, pattern string, limit int) (map[string]int, bool, error) {
	limit = channelsLimit(limit)
	replies, err := cl.gather(ctx, clusterRequest{Op: opChannels, Pattern: pattern, Limit: limit})
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
// answered, sorted by ID. Uptime is the time since the instance's Cluster
// started.
func (cl *Cluster) Info(ctx context.Context) ([]fabric.InstanceInfo, error) {
	replies, err := cl.gather(ctx, clusterRequest{Op: opInfo})
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
// connections of userID and answers how many.
func (cl *Cluster) Disconnect(ctx context.Context, userID string, code int, reason string) (int, error) {
	if userID == "" {
		return 0, errors.New("redis: Disconnect: empty user id")
	}
	return cl.act(ctx, clusterRequest{Op: opDisconnect, User: userID, Code: code, Reason: reason})
}

// Unsubscribe implements fabric.ClusterView: every instance unsubscribes
// its connections of userID from topic and answers how many were
// subscribed.
func (cl *Cluster) Unsubscribe(ctx context.Context, userID, topic string) (int, error) {
	if userID == "" {
		return 0, errors.New("redis: Unsubscribe: empty user id")
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	return cl.act(ctx, clusterRequest{Op: opUnsubscribe, User: userID, Topic: topic})
}

func (cl *Cluster) act(ctx context.Context, req clusterRequest) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("redis: cluster %s: %w", req.Op, err)
	}
	replies, err := cl.gather(ctx, req)
	n := 0
	for _, r := range replies {
		n += r.Affected
	}
	return n, err
}

// gather publishes one request and collects an answer from every known
// instance, or as many as arrive before the deadline.
func (cl *Cluster) gather(ctx context.Context, req clusterRequest) ([]clusterReply, error) {
	if cl.closed.Load() {
		return nil, fmt.Errorf("redis: cluster %s: %w", req.Op, ErrClosed)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cl.opts.Timeout)
		defer cancel()
	}
	want := cl.Members()
	req.Token = strconv.FormatUint(cl.nextReq.Add(1), 36)
	req.Reply = cl.replyChannel
	ch := make(chan clusterReply, want+4)
	cl.respMu.Lock()
	cl.pending[req.Token] = ch
	cl.respMu.Unlock()
	defer func() {
		cl.respMu.Lock()
		delete(cl.pending, req.Token)
		cl.respMu.Unlock()
	}()
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("redis: cluster %s: %w", req.Op, err)
	}
	if err := cl.b.publish(ctx, "cluster "+req.Op, cl.reqChannel, string(body)); err != nil {
		return nil, err
	}
	replies := make([]clusterReply, 0, want)
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
			return replies, fmt.Errorf("redis: cluster %s: %w: %d of %d instances answered (%v)", req.Op, ErrPartialCluster, len(seen), want, ctx.Err())
		}
	}
	return replies, nil
}

// onReply routes one answer to the call waiting for it.
func (cl *Cluster) onReply(payload string) {
	var r clusterReply
	if json.Unmarshal([]byte(payload), &r) != nil || r.ID == "" {
		return
	}
	cl.respMu.Lock()
	ch := cl.pending[r.Token]
	cl.respMu.Unlock()
	if ch != nil {
		select {
		case ch <- r:
		default: // more answers than expected: drop
		}
	}
}

// onRequest queues a request for serve (the connection's reader must not
// wait for the answer's publish).
func (cl *Cluster) onRequest(payload string) {
	var req clusterRequest
	if json.Unmarshal([]byte(payload), &req) != nil || req.Reply == "" {
		return
	}
	select {
	case cl.requests <- req:
	default:
		cl.log.Warn("cluster: request dropped: queue full", "op", req.Op)
	}
}

// serve answers requests, one at a time, until Close.
func (cl *Cluster) serve() {
	defer cl.wg.Done()
	for {
		select {
		case <-cl.stop:
			return
		case <-cl.hello:
			cl.announce("hb")
		case req := <-cl.requests:
			r, ok := cl.answer(req)
			if !ok {
				continue
			}
			body, err := json.Marshal(r)
			if err != nil {
				cl.log.Warn("cluster: encode reply failed", "op", req.Op, "err", err)
				continue
			}
			if err := cl.b.publish(context.Background(), "cluster reply", req.Reply, string(body)); err != nil {
				cl.b.logFailure("cluster: reply failed", err, "op", req.Op)
			}
		}
	}
}

// answer computes this instance's answer to req (and acts on its
// connections); ok is false for an operation of a later version.
func (cl *Cluster) answer(req clusterRequest) (clusterReply, bool) {
	r := clusterReply{Token: req.Token, ID: cl.id, Connections: cl.node.Connections()}
	switch req.Op {
	case opCount:
		if req.Topic != "" {
			r.Subscribers = cl.node.Subscribers(req.Topic)
		}
	case opChannels:
		r.Channels, r.Truncated = localChannels(cl.node, req.Pattern, channelsLimit(req.Limit), maxReplyBytes)
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
		return r, false
	}
	return r, true
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
		return u.clients
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

func (cl *Cluster) onAnnounce(payload string) {
	var a announce
	if json.Unmarshal([]byte(payload), &a) != nil || a.ID == "" || a.ID == cl.id {
		return
	}
	switch a.Op {
	case "bye":
		cl.membersMu.Lock()
		delete(cl.members, a.ID)
		cl.membersMu.Unlock()
	case "hello":
		cl.heard(a.ID)
		select { // answered by serve: the reader must not publish
		case cl.hello <- struct{}{}:
		default:
		}
	default:
		cl.heard(a.ID)
	}
}

func (cl *Cluster) heard(id string) {
	if id == cl.id {
		return
	}
	cl.membersMu.Lock()
	if _, ok := cl.members[id]; ok || len(cl.members) < maxMembers {
		cl.members[id] = time.Now()
	}
	cl.membersMu.Unlock()
}

func (cl *Cluster) announce(op string) {
	b, _ := json.Marshal(announce{ID: cl.id, Op: op})
	if err := cl.b.publish(context.Background(), "cluster announce", cl.hbChannel, string(b)); err != nil {
		cl.b.logFailure("cluster: announce failed", err)
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
// this instance subscribes to the user's channel (without waiting for
// Redis).
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
		u = &userEntry{cl: cl, key: key, channel: cl.userChannel(key)}
		_ = cl.b.ps.subscribe(context.Background(), u.channel, u, false) // never fails without waiting
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
// this instance drops the user's channel.
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
		cl.b.ps.unsubscribe(u.channel, u)
	}
}

// deliver hands user messages of one queue to the user's local
// connections, in arrival order.
func (cl *Cluster) deliver(ch chan userMsg) {
	defer cl.wg.Done()
	for {
		select {
		case <-cl.stop:
			return
		case m := <-ch:
			s := cl.userShard(m.u.key)
			s.mu.Lock()
			to := m.u.clients
			s.mu.Unlock()
			if len(to) == 0 {
				continue
			}
			env := []byte(m.env)
			topic, _, _, ok := fabric.SplitEnvelope(env)
			if !ok {
				continue
			}
			cl.node.SendEnvelope(to, string(topic), env)
		}
	}
}

// Close says goodbye to the other instances and stops answering. It is
// idempotent.
func (cl *Cluster) Close() error {
	cl.closeOnce.Do(func() {
		cl.closed.Store(true)
		if cl.removeObs != nil {
			cl.removeObs()
		}
		for _, s := range cl.sys {
			cl.b.ps.unsubscribe(s.ch, s.h)
		}
		if cl.removeObs != nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			b, _ := json.Marshal(announce{ID: cl.id, Op: "bye"})
			_ = cl.b.publish(ctx, "cluster announce", cl.hbChannel, string(b))
			cancel()
		}
		for i := range cl.users {
			s := &cl.users[i]
			s.mu.Lock()
			for k, u := range s.users {
				cl.b.ps.unsubscribe(u.channel, u)
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
