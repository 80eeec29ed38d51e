// Package wsclient is a small Go client for Fabric's protocol: dial,
// subscribe (acknowledged), unsubscribe, replay, RPC calls, a stream of
// envelopes, and reconnection with backoff that re-subscribes and resumes
// persistent topics from the last sequence seen. It speaks it over a
// WebSocket (ws:// and wss:// URLs) or over Server-Sent Events with POSTed
// frames (http:// and https:// URLs of the SSE endpoint, e.g.
// http://127.0.0.1:8080/events).
package wsclient

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// ErrClosed is returned after Close.
var ErrClosed = errors.New("wsclient: closed")

// ErrDisconnected fails calls in flight when the connection drops.
var ErrDisconnected = errors.New("wsclient: disconnected")

// Envelope is one message from the server: {"topic","event","data"[,"seq"]}.
type Envelope struct {
	Topic string          `json:"topic"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	Seq   uint64          `json:"seq,omitempty"`
}

// RPCError is a failed RPC call, with the server's LiveError code.
type RPCError struct {
	Code    string
	Message string
}

func (e *RPCError) Error() string { return e.Code + ": " + e.Message }

// DeniedError is a refused subscribe.
type DeniedError struct {
	Topic  string
	Reason string
}

func (e *DeniedError) Error() string {
	return "subscribe " + strconv.Quote(e.Topic) + " denied: " + e.Reason
}

// Options configures Dial. The zero value connects once, with no reconnect.
type Options struct {
	// TLSConfig is used for wss:// and https:// URLs (default: the
	// system's roots).
	TLSConfig *tls.Config
	// Header is sent with the upgrade request. Origin defaults to the
	// server's own http origin, as a same-origin browser page would send.
	Header http.Header
	// LocalAddr binds the client side of the TCP connection (for example
	// "127.0.0.7:0" to spread load tests over loopback addresses).
	LocalAddr string
	// Reconnect redials after a drop, re-subscribes, and resumes topics
	// whose messages carried seq from the last one seen.
	Reconnect bool
	// MinBackoff and MaxBackoff bound the reconnect delay (100ms, 5s).
	MinBackoff, MaxBackoff time.Duration
	// Buffer is the Events channel capacity (default 1024). When it is full
	// the client stops reading, as a slow browser tab would.
	Buffer int
	// OnConnect runs after every successful (re)connection.
	OnConnect func()
}

// Client is one logical connection, possibly spanning reconnects.
type Client struct {
	url    string
	opts   Options
	events chan Envelope

	wmu  sync.Mutex
	conn link // current connection, nil while reconnecting

	mu      sync.Mutex
	pending map[string]chan reply // ref or rpc id → waiter
	topics  map[string]uint64     // subscribed topic → last seq seen
	epochs  map[string]string     // topic → history epoch its seqs belong to
	nextID  uint64
	closed  bool
	code    int // close code received from the server
	reason  string

	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
	connected atomic.Int64
}

type reply struct {
	env  Envelope
	ctrl control
	err  error
}

type control struct {
	Type   string          `json:"type"`
	Topic  string          `json:"topic"`
	Ref    json.RawMessage `json:"ref"`
	Reason string          `json:"reason"`
}

// Dial connects to a Fabric WebSocket endpoint such as ws://127.0.0.1:8080/ws.
func Dial(ctx context.Context, rawURL string, opts Options) (*Client, error) {
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Second
	}
	if opts.Buffer <= 0 {
		opts.Buffer = 1024
	}
	c := &Client{
		url: rawURL, opts: opts, events: make(chan Envelope, opts.Buffer),
		pending: map[string]chan reply{}, topics: map[string]uint64{}, done: make(chan struct{}),
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	c.setConn(conn)
	c.wg.Add(1)
	go c.run(conn)
	return c, nil
}

// Events returns the stream of envelopes for subscribed topics, replays and
// direct sends (RPC answers are consumed by Call). It is closed by Close.
func (c *Client) Events() <-chan Envelope { return c.events }

// Connections returns how many times the client has connected.
func (c *Client) Connections() int { return int(c.connected.Load()) }

// CloseCode returns the close code and reason the server last sent, if any.
func (c *Client) CloseCode() (int, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code, c.reason
}

func (c *Client) dial(ctx context.Context) (link, error) {
	u, err := url.Parse(c.url)
	if err != nil {
		return nil, fmt.Errorf("wsclient: url: %w", err)
	}
	h := http.Header{}
	for k, v := range c.opts.Header {
		h[k] = v
	}
	if h.Get("Origin") == "" {
		scheme := "http"
		if u.Scheme == "wss" || u.Scheme == "https" {
			scheme = "https"
		}
		h.Set("Origin", scheme+"://"+u.Host)
	}
	var l link
	if u.Scheme == "http" || u.Scheme == "https" {
		l, err = c.dialSSE(ctx, u, h)
	} else {
		l, err = c.dialWS(ctx, h)
	}
	if err != nil {
		return nil, err
	}
	c.connected.Add(1)
	return l, nil
}

func (c *Client) dialWS(ctx context.Context, h http.Header) (link, error) {
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(h), Timeout: 10 * time.Second, TLSConfig: c.opts.TLSConfig}
	if c.opts.LocalAddr != "" {
		la, err := net.ResolveTCPAddr("tcp", c.opts.LocalAddr)
		if err != nil {
			return nil, fmt.Errorf("wsclient: local addr: %w", err)
		}
		nd := net.Dialer{LocalAddr: la, Timeout: 10 * time.Second}
		d.NetDial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nd.DialContext(ctx, network, addr)
		}
	}
	conn, br, _, err := d.Dial(ctx, c.url)
	if err != nil {
		return nil, fmt.Errorf("wsclient: dial %s: %w", c.url, err)
	}
	if br != nil { // bytes read past the handshake: keep them in front
		conn = &prefixed{Conn: conn, r: io.MultiReader(br, conn)}
	}
	return &wsLink{c: c, conn: conn}, nil
}

type prefixed struct {
	net.Conn
	r io.Reader
}

func (p *prefixed) Read(b []byte) (int, error) { return p.r.Read(b) }

func (c *Client) setConn(conn link) {
	c.wmu.Lock()
	c.conn = conn
	c.wmu.Unlock()
}

// run reads the current connection and, with Reconnect, replaces it.
func (c *Client) run(conn link) {
	defer c.wg.Done()
	defer close(c.events)
	if c.opts.OnConnect != nil {
		c.opts.OnConnect()
	}
	for {
		code, reason := conn.read(c.handle)
		if code != 0 {
			c.mu.Lock()
			c.code, c.reason = code, reason
			c.mu.Unlock()
		}
		c.setConn(nil)
		conn.cut()
		c.failPending(ErrDisconnected)
		if !c.opts.Reconnect || c.isClosed() {
			return
		}
		next, ok := c.redial()
		if !ok {
			return
		}
		conn = next
	}
}

func (c *Client) redial() (link, bool) {
	delay := c.opts.MinBackoff
	for {
		jitter := time.Duration(rand.Int64N(int64(delay)/2 + 1))
		select {
		case <-c.done:
			return nil, false
		case <-time.After(delay + jitter):
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := c.dial(ctx)
		cancel()
		if err == nil {
			c.setConn(conn)
			c.resubscribe()
			if c.opts.OnConnect != nil {
				c.opts.OnConnect()
			}
			return conn, true
		}
		delay = min(delay*2, c.opts.MaxBackoff)
	}
}

// resubscribe restores every subscription, resuming from the last seq seen.
func (c *Client) resubscribe() {
	c.mu.Lock()
	msgs := make([]map[string]any, 0, len(c.topics))
	for t, seq := range c.topics {
		m := map[string]any{"type": "subscribe", "topic": t}
		if seq > 0 {
			m["since"] = seq
			if e := c.epochs[t]; e != "" {
				m["epoch"] = e
			}
		}
		msgs = append(msgs, m)
	}
	c.mu.Unlock()
	for _, m := range msgs {
		_ = c.Send(m)
	}
}

// handle routes one server message; false stops reading (client closed).
func (c *Client) handle(data []byte) bool {
	var m struct {
		Type   string          `json:"type"`
		Topic  string          `json:"topic"`
		Event  string          `json:"event"`
		Data   json.RawMessage `json:"data"`
		Seq    uint64          `json:"seq"`
		Ref    json.RawMessage `json:"ref"`
		Reason string          `json:"reason"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return true
	}
	if m.Type != "" && len(m.Ref) > 0 {
		c.resolve("ref:"+string(m.Ref), reply{ctrl: control{Type: m.Type, Topic: m.Topic, Ref: m.Ref, Reason: m.Reason}})
		return true
	}
	env := Envelope{Topic: m.Topic, Event: m.Event, Data: m.Data, Seq: m.Seq}
	if env.Topic == "__rpc" {
		if env.Event == "__batch" {
			var b struct {
				Batch []json.RawMessage `json:"batch"`
			}
			_ = json.Unmarshal(env.Data, &b)
			for _, r := range b.Batch {
				var id struct {
					ID string `json:"id"`
				}
				_ = json.Unmarshal(r, &id)
				c.resolve("rpc:"+id.ID, reply{env: Envelope{Topic: env.Topic, Event: id.ID, Data: r}})
			}
			return true
		}
		c.resolve("rpc:"+env.Event, reply{env: env})
		return true
	}
	if env.Topic == "" {
		return true
	}
	if topic, ok := strings.CutPrefix(env.Topic, "__replay:"); ok && env.Event == "end" {
		var end struct {
			Epoch string `json:"epoch"`
		}
		if json.Unmarshal(env.Data, &end) == nil && end.Epoch != "" {
			c.mu.Lock()
			if c.epochs == nil {
				c.epochs = make(map[string]string)
			}
			c.epochs[topic] = end.Epoch
			c.mu.Unlock()
		}
	}
	if env.Seq > 0 {
		c.mu.Lock()
		if _, ok := c.topics[env.Topic]; ok && env.Seq > c.topics[env.Topic] {
			c.topics[env.Topic] = env.Seq
		}
		c.mu.Unlock()
	}
	select {
	case c.events <- env:
		return true
	case <-c.done:
		return false
	}
}

func (c *Client) resolve(key string, r reply) {
	c.mu.Lock()
	ch := c.pending[key]
	delete(c.pending, key)
	c.mu.Unlock()
	if ch != nil {
		ch <- r
	}
}

func (c *Client) failPending(err error) {
	c.mu.Lock()
	p := c.pending
	c.pending = map[string]chan reply{}
	c.mu.Unlock()
	for _, ch := range p {
		ch <- reply{err: err}
	}
}

func (c *Client) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// Send writes v as a JSON text frame.
func (c *Client) Send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.SendRaw(b)
}

// SendRaw writes b as one text frame, unchanged.
func (c *Client) SendRaw(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.conn == nil {
		return ErrDisconnected
	}
	return c.conn.write(b)
}

// request sends msg and waits for the reply filed under key.
func (c *Client) request(ctx context.Context, key string, msg any) (reply, error) {
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return reply{}, ErrClosed
	}
	c.pending[key] = ch
	c.mu.Unlock()
	if err := c.Send(msg); err != nil {
		c.mu.Lock()
		delete(c.pending, key)
		c.mu.Unlock()
		return reply{}, err
	}
	select {
	case r := <-ch:
		return r, r.err
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, key)
		c.mu.Unlock()
		return reply{}, ctx.Err()
	}
}

func (c *Client) id() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	return strconv.FormatUint(c.nextID, 36)
}

// Subscribe subscribes to topic and waits for the server's acknowledgement.
func (c *Client) Subscribe(ctx context.Context, topic string) error {
	return c.subscribe(ctx, topic, nil)
}

// SubscribeSince subscribes to topic, first receiving every retained message
// after seq (the server guarantees no gap and no duplicate at the seam).
func (c *Client) SubscribeSince(ctx context.Context, topic string, seq uint64) error {
	return c.subscribe(ctx, topic, &seq)
}

func (c *Client) subscribe(ctx context.Context, topic string, since *uint64) error {
	ref := c.id()
	msg := map[string]any{"type": "subscribe", "topic": topic, "ref": ref}
	if since != nil {
		msg["since"] = *since
	}
	c.mu.Lock()
	if _, ok := c.topics[topic]; !ok || since != nil {
		var s uint64
		if since != nil {
			s = *since
		}
		c.topics[topic] = s
	}
	c.mu.Unlock()
	r, err := c.request(ctx, "ref:"+strconv.Quote(ref), msg)
	if err != nil {
		return err
	}
	if r.ctrl.Type == "subscribe-denied" {
		c.mu.Lock()
		delete(c.topics, topic)
		c.mu.Unlock()
		return &DeniedError{Topic: topic, Reason: r.ctrl.Reason}
	}
	return nil
}

// Unsubscribe drops the subscription and waits for the acknowledgement.
func (c *Client) Unsubscribe(ctx context.Context, topic string) error {
	c.mu.Lock()
	delete(c.topics, topic)
	c.mu.Unlock()
	ref := c.id()
	_, err := c.request(ctx, "ref:"+strconv.Quote(ref), map[string]any{"type": "unsubscribe", "topic": topic, "ref": ref})
	return err
}

// Replay asks for topic's messages after seq; they arrive on Events on
// topic "__replay:"+topic as "msg" events, then an "end" event.
func (c *Client) Replay(topic string, since uint64) error {
	return c.Send(map[string]any{"type": "replay", "topic": topic, "since": since})
}

// Call invokes an RPC handler and returns its result data.
func (c *Client) Call(ctx context.Context, path string, args ...any) (json.RawMessage, error) {
	id := c.id()
	if args == nil {
		args = []any{}
	}
	r, err := c.request(ctx, "rpc:"+id, map[string]any{"rpc": path, "id": id, "args": args})
	if err != nil {
		return nil, err
	}
	var res struct {
		OK    bool            `json:"ok"`
		Data  json.RawMessage `json:"data"`
		Code  string          `json:"code"`
		Error string          `json:"error"`
	}
	if err := json.Unmarshal(r.env.Data, &res); err != nil {
		return nil, fmt.Errorf("wsclient: bad RPC response: %w", err)
	}
	if !res.OK {
		return nil, &RPCError{Code: res.Code, Message: res.Error}
	}
	return res.Data, nil
}

// Next returns the next envelope, or an error when ctx ends or the client closes.
func (c *Client) Next(ctx context.Context) (Envelope, error) {
	select {
	case e, ok := <-c.events:
		if !ok {
			return Envelope{}, ErrClosed
		}
		return e, nil
	case <-ctx.Done():
		return Envelope{}, ctx.Err()
	}
}

// Close sends a normal close frame and stops the client.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		close(c.done)
		c.wmu.Lock()
		if c.conn != nil {
			c.conn.close()
		}
		c.wmu.Unlock()
	})
	c.wg.Wait()
	return nil
}

// Drop cuts the connection without a close frame, as a network failure
// would; with Reconnect the client then redials.
func (c *Client) Drop() {
	c.wmu.Lock()
	if c.conn != nil {
		c.conn.cut()
	}
	c.wmu.Unlock()
}
