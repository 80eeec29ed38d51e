// Package fabric is the core of the Fabric realtime server: topics and their
// validation, the wire envelope, the Node that owns local connections and
// their subscriptions, RPC dispatch, and the interfaces (Broker, Transport)
// that backends and edges implement.
//
// A publish on any instance reaches every subscriber on every instance: the
// Node hands the envelope to its Broker (NATS subjects by default); every
// instance with local subscribers holds one broker subscription per topic,
// frames each arriving envelope once and queues that same frame to each
// local subscriber.
package fabric

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ErrNodeClosed is returned by a Node after Close.
var ErrNodeClosed = errors.New("fabric: node closed")

// Config configures a Node. Broker is required; the rest have usable zero values.
type Config struct {
	// Broker carries messages between instances.
	Broker Broker
	// Registerer receives the node's metrics; nil leaves them unregistered.
	Registerer prometheus.Registerer
	// Logger receives the node's logs; nil discards them.
	Logger *slog.Logger
	// Hooks are the application's callbacks into every client session
	// (see Hooks); the zero value allows every subscribe and no client
	// publish.
	Hooks Hooks
	// Proxies decides whose X-Forwarded-For counts when a transport asks
	// where a connection comes from (ClientAddr); nil trusts no proxy.
	Proxies *ProxyPolicy
	// ConnectTimeout bounds the Connect hook (default 10s).
	ConnectTimeout time.Duration
	// BeforeExecute runs before every RPC handler; an error (a *LiveError
	// for a client-visible code such as OVERLOADED) refuses the call.
	BeforeExecute func(ctx context.Context, call *Call) error
	// History keeps persistent topics' messages for resume (see History);
	// nil keeps none, and Persist() then fails. It must belong to the same
	// backend as Broker.
	History History
	// Persistent selects the topics whose every message is kept in History
	// (see MatchTopics); nil keeps only messages published with Persist().
	Persistent func(topic string) bool
	// HistoryBreaker, when set, guards History.Append (a circuit breaker
	// such as *breaker.Breaker): while it is open persistent publishes fail
	// at once with ErrBackendUnavailable instead of waiting PublishTimeout.
	// Only errors wrapping ErrBackendUnavailable should count as failures.
	HistoryBreaker interface {
		Allow() (done func(error), err error)
	}
	// PublishTimeout bounds a publish whose context has no deadline: a
	// history that cannot store the message (JetStream without a leader,
	// say) fails the publish with ErrBackendUnavailable after this long
	// instead of holding the caller. Default DefaultPublishTimeout.
	PublishTimeout time.Duration
	// ReplayCache is how many recent messages of each persistent topic with
	// local subscribers are kept in memory to answer resumes without a
	// history read (default DefaultReplayCache; negative: none).
	ReplayCache int
	// Limits bound what one connection can hold or do (see Limits); the
	// zero value has the defaults.
	Limits Limits
	// ResumeLimits bound the history reads clients can cause (see
	// ResumeLimits); the zero value has the defaults.
	ResumeLimits ResumeLimits
	// ResumeHold is how many live messages of a topic are held back for one
	// client while its resume reads history (default DefaultResumeHold);
	// past it they are dropped and read from the history again.
	ResumeHold int

	// Pressure configures the pressure signals (Node.Pressure, see
	// pressure.go and docs/admission.md); the zero value has the defaults.
	Pressure PressureOptions
}

// DefaultPublishTimeout is Config.PublishTimeout's default.
const DefaultPublishTimeout = 5 * time.Second

// Node is one Fabric instance's platform: it owns local connections, their
// subscriptions and the broker feeds behind them, and publishes cluster-wide.
type Node struct {
	cfg     Config
	broker  Broker
	log     *slog.Logger
	metrics *Metrics
	hub     hub
	clients clientRegistry
	rpc     rpcMux

	resumeHold int
	reads      chan struct{} // history read slots (ResumeLimits.MaxConcurrentReads)
	resumeWG   sync.WaitGroup

	nextID  atomic.Uint64
	conns   atomic.Int64
	closed  atomic.Bool
	publish prometheus.Counter
	ext     nodeExt // observers and ID (observe.go)

	pressure pressureState // pressure signals and their sampler (pressure.go)
}

// NewNode returns a Node publishing through cfg.Broker.
func NewNode(cfg Config) (*Node, error) {
	if cfg.Broker == nil {
		return nil, errors.New("fabric: Config.Broker is required")
	}
	n := &Node{cfg: cfg, broker: cfg.Broker, log: cfg.Logger, resumeHold: cfg.ResumeHold}
	if n.resumeHold <= 0 {
		n.resumeHold = DefaultResumeHold
	}
	n.cfg.ResumeLimits.setDefaults()
	n.cfg.Limits.setDefaults()
	n.reads = make(chan struct{}, n.cfg.ResumeLimits.MaxConcurrentReads)
	if n.cfg.ConnectTimeout <= 0 {
		n.cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if n.cfg.PublishTimeout <= 0 {
		n.cfg.PublishTimeout = DefaultPublishTimeout
	}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	n.hub.node = n
	n.hub.seed = maphash.MakeSeed()
	if err := n.startPressure(); err != nil { // first: bad options register nothing
		return nil, err
	}
	n.metrics = newMetrics(n, cfg.Registerer)
	n.publish = n.metrics.Published
	n.HandleRPC(PublishRPCPath, n.publishRPC)
	return n, nil
}

// Broker returns the node's broker.
func (n *Node) Broker() Broker { return n.broker }

// Metrics returns the node's instruments, for edges and extensions.
func (n *Node) Metrics() *Metrics { return n.metrics }

// Logger returns the node's logger.
func (n *Node) Logger() *slog.Logger { return n.log }

// Connect attaches a connection and returns its Client; the Open hook
// runs before it returns.
func (n *Node) Connect(t Transport, userData any, remoteAddr string) *Client {
	c := &Client{id: n.nextID.Add(1), node: n, transport: t, remoteAddr: remoteAddr, key: newConnectionKey()}
	c.setUserData(userData)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	n.clients.add(c)
	n.conns.Add(1)
	n.ext.connected(c)
	n.armExpiry(c)
	if h := n.cfg.Hooks.Open; h != nil {
		h(c)
	}
	return c
}

// Disconnect detaches c, drops all its subscriptions, cancels its context
// and runs the Disconnect hook with code and reason. It is idempotent.
func (n *Node) Disconnect(c *Client, code int, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.cancel()
	c.stopExpiry()
	topics := c.topics
	c.topics = nil
	for t := range topics {
		n.hub.remove(t, c)
	}
	n.ext.disconnected(c)
	c.mu.Unlock()
	if n.clients.remove(c) {
		n.conns.Add(-1)
	}
	if h := n.cfg.Hooks.Disconnect; h != nil {
		h(c, code, reason)
	}
}

// Subscribe subscribes c to topic on this instance (idempotent).
func (n *Node) Subscribe(c *Client, topic string) error {
	if err := ValidateTopic(topic); err != nil {
		return err
	}
	if n.closed.Load() {
		return ErrNodeClosed
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClientClosed
	}
	if _, ok := c.topics[topic]; ok {
		return nil
	}
	if err := n.hub.add(topic, c); err != nil {
		return err
	}
	if c.topics == nil {
		c.topics = make(map[string]struct{}, 2)
	}
	c.topics[topic] = struct{}{}
	n.ext.subscribed(c, topic)
	return nil
}

// Unsubscribe removes c's subscription to topic, if any.
func (n *Node) Unsubscribe(c *Client, topic string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.topics[topic]; !ok {
		return
	}
	delete(c.topics, topic)
	n.hub.remove(topic, c)
	n.ext.unsubscribed(c, topic)
}

// PublishOption changes how one Publish is carried.
type PublishOption func(*PublishOptions)

// PublishOptions are the resolved options of one Publish, for extensions.
type PublishOptions struct {
	// Persist asks for the message to be kept in the topic's history.
	Persist bool
	// MsgID makes a persistent publish idempotent (see MsgID).
	MsgID string
}

// Publish sends {topic, event, data} to every subscriber of topic on every
// instance and returns the message's history sequence (0 when the topic is
// not persistent). data is encoded as JSON once (see EncodeData).
func (n *Node) Publish(ctx context.Context, topic, event string, data any, opts ...PublishOption) (uint64, error) {
	if err := ValidateTopic(topic); err != nil {
		return 0, err
	}
	if err := ValidateEvent(event); err != nil {
		return 0, err
	}
	d, err := EncodeData(data)
	if err != nil {
		return 0, err
	}
	return n.PublishEnvelope(ctx, topic, Envelope(topic, event, d), opts...)
}

// PublishEnvelope publishes a ready envelope (see AppendEnvelope) for an
// already validated topic.
func (n *Node) PublishEnvelope(ctx context.Context, topic string, envelope []byte, opts ...PublishOption) (uint64, error) {
	if n.closed.Load() {
		return 0, ErrNodeClosed
	}
	var po PublishOptions
	for _, o := range opts {
		o(&po)
	}
	if po.Persist || (n.cfg.Persistent != nil && n.cfg.Persistent(topic)) {
		h := n.cfg.History
		if h == nil {
			return 0, ErrNoHistory
		}
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, n.cfg.PublishTimeout)
			defer cancel()
		}
		// The history delivers the stored message, with its seq, to every
		// instance's subscribers.
		var done func(error)
		if b := n.cfg.HistoryBreaker; b != nil {
			var err error
			if done, err = b.Allow(); err != nil {
				return 0, fmt.Errorf("%w: history: %w", ErrBackendUnavailable, err)
			}
		}
		pos, err := h.Append(ctx, topic, envelope, po.MsgID)
		if done != nil {
			done(err)
		}
		if err != nil {
			if ctx.Err() != nil && !errors.Is(err, ErrBackendUnavailable) {
				err = fmt.Errorf("%w: %w", ErrBackendUnavailable, err)
			}
			return 0, err
		}
		n.publish.Inc()
		n.pressure.countPublish(topic, len(envelope))
		return pos.Seq, nil
	}
	if err := n.broker.Publish(ctx, topic, envelope); err != nil {
		return 0, err
	}
	n.publish.Inc()
	n.pressure.countPublish(topic, len(envelope))
	return 0, nil
}

// Send delivers {topic, event, data} to one connection only.
func (n *Node) Send(c *Client, topic, event string, data any) error {
	m, err := n.message(topic, event, data)
	if err != nil {
		return err
	}
	n.deliver(m, []*Client{c})
	return nil
}

// SendTo delivers {topic, event, data} to every local connection whose user
// data satisfies filter and returns how many matched. The envelope is
// encoded once.
func (n *Node) SendTo(filter func(userData any) bool, topic, event string, data any) (int, error) {
	m, err := n.message(topic, event, data)
	if err != nil {
		return 0, err
	}
	var matched []*Client
	n.clients.each(func(c *Client) bool {
		if filter(c.UserData()) {
			matched = append(matched, c)
		}
		return true
	})
	n.deliver(m, matched)
	return len(matched), nil
}

// SendRPCResult answers an RPC call on the __rpc topic in the shape the
// svelte-realtime client expects; batch results go out as event "__batch".
func (n *Node) SendRPCResult(c *Client, correlationID string, payload any) error {
	data, err := json.Marshal(payload)
	if err != nil {
		return fmt.Errorf("fabric: encode RPC result: %w", err)
	}
	event, err := json.Marshal(correlationID) // ids are client-chosen: escape them
	if err != nil {
		return err
	}
	env := make([]byte, 0, len(data)+len(event)+40)
	env = append(env, `{"topic":"__rpc","event":`...)
	env = append(env, event...)
	env = append(env, `,"data":`...)
	env = append(env, data...)
	env = append(env, '}')
	n.deliver(NewMessage(RPCTopic, 0, env), []*Client{c})
	return nil
}

func (n *Node) message(topic, event string, data any) (*Message, error) {
	if err := ValidateTopic(topic); err != nil {
		return nil, err
	}
	if err := ValidateEvent(event); err != nil {
		return nil, err
	}
	d, err := EncodeData(data)
	if err != nil {
		return nil, err
	}
	return NewMessage(topic, 0, Envelope(topic, event, d)), nil
}

// deliver hands m to each client; it is the per-message hot path.
func (n *Node) deliver(m *Message, to []*Client) {
	sent := 0
	for _, c := range to {
		if c.holds.Load() != 0 && c.hold.Load().take(m, c) {
			continue // held back: a resume of this topic is reading history
		}
		if c.transport.Deliver(m) {
			sent++
		}
	}
	n.metrics.MessagesOut.Add(float64(sent))
}

// Connections returns the number of connections on this instance.
func (n *Node) Connections() int { return int(n.conns.Load()) }

// Subscribers returns the number of this instance's connections subscribed to topic.
func (n *Node) Subscribers(topic string) int { return n.hub.count(topic) }

// Topics calls fn for every topic with subscribers on this instance.
func (n *Node) Topics(fn func(topic string, subscribers int)) { n.hub.each(fn) }

// Client returns the local client with the given id, or nil.
func (n *Node) Client(id uint64) *Client { return n.clients.get(id) }

// Each calls fn for every local client until fn returns false.
func (n *Node) Each(fn func(*Client) bool) { n.clients.each(fn) }

// Close stops every broker feed. It does not close connections: the edge
// that owns them does (with 1001 Going Away) before the node closes.
func (n *Node) Close() error {
	if !n.closed.CompareAndSwap(false, true) {
		return nil
	}
	n.hub.closeAll()
	n.resumeWG.Wait() // the edges closed their connections, which ends them
	n.stopPressure()
	return nil
}

// Topic returns a handle for publishing to one topic.
func (n *Node) Topic(name string) *Topic { return &Topic{node: n, name: name} }

// Topic is a publishing handle for one topic, with the event conventions of
// the client stores (crud, count).
type Topic struct {
	node *Node
	name string
}

// Name returns the topic name.
func (t *Topic) Name() string { return t.name }

// Publish publishes event with data on the topic.
func (t *Topic) Publish(ctx context.Context, event string, data any, opts ...PublishOption) (uint64, error) {
	return t.node.Publish(ctx, t.name, event, data, opts...)
}

// Created publishes a "created" event (crud and lookup stores add the item).
func (t *Topic) Created(ctx context.Context, item any) (uint64, error) {
	return t.Publish(ctx, "created", item)
}

// Updated publishes an "updated" event (stores replace the item by key).
func (t *Topic) Updated(ctx context.Context, item any) (uint64, error) {
	return t.Publish(ctx, "updated", item)
}

// Deleted publishes a "deleted" event (stores remove the item by key).
func (t *Topic) Deleted(ctx context.Context, item any) (uint64, error) {
	return t.Publish(ctx, "deleted", item)
}

// Set publishes a "set" event: count stores take value as the new count.
func (t *Topic) Set(ctx context.Context, value float64) (uint64, error) {
	return t.Publish(ctx, "set", value)
}

// Increment publishes an "increment" event of by.
func (t *Topic) Increment(ctx context.Context, by float64) (uint64, error) {
	return t.Publish(ctx, "increment", by)
}

// Decrement publishes a "decrement" event of by.
func (t *Topic) Decrement(ctx context.Context, by float64) (uint64, error) {
	return t.Publish(ctx, "decrement", by)
}
