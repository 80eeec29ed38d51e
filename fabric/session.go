package fabric

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// This file is the session layer: the client protocol (docs/protocol.md),
// the same for every transport. A transport (the WebSocket edge, SSE)
// authenticates a request with Authenticate, attaches the connection with
// Connect, hands each client frame to HandleFrame, delivers what the Node
// sends through its Transport, and ends with Disconnect. Hooks run here, so
// every transport gets them.

// Hooks are the application's callbacks into every client session, whatever
// the transport. Each is optional.
type Hooks struct {
	// Connect authenticates a connection request (a WebSocket upgrade, an
	// SSE request) and returns the connection's user data. ErrUnauthorized
	// refuses it with 401, a *StatusError with its status, any other error
	// with 500; slower than Config.ConnectTimeout, 504.
	Connect func(r *http.Request) (userData any, err error)
	// Open runs once a connection is attached, before its first frame.
	Open func(c *Client)
	// Subscribe gates a client's subscribe; an error denies it (a
	// *LiveError's code reaches the client, any other error FORBIDDEN).
	Subscribe func(c *Client, topic string) error
	// Publish gates a client's publish (the "fabric/publish" call); an error
	// refuses it as Subscribe's does. Without it clients publish nowhere.
	Publish func(c *Client, topic, event string) error
	// Refresh verifies a token a connected client sends to extend its
	// session ({"type":"refresh","token":T}) and returns the connection's
	// new user data (an Expirer to move the expiry); an error refuses it
	// (a *LiveError's code is the reason, else FORBIDDEN). A token of
	// another user must be refused (ErrTokenUserChanged).
	Refresh func(c *Client, token string) (userData any, err error)
	// Message receives every client frame the protocol does not consume;
	// data is the hook's own copy.
	Message func(c *Client, data []byte, binary bool)
	// Disconnect runs once when the connection ends, with its close code and
	// reason (1006 when the peer vanished without a word).
	Disconnect func(c *Client, code int, reason string)
}

// DefaultConnectTimeout bounds the Connect hook.
const DefaultConnectTimeout = 10 * time.Second

// ErrUnauthorized, returned by the Connect hook, refuses the connection
// with 401.
var ErrUnauthorized = errors.New("fabric: unauthorized")

// StatusError, returned by the Connect hook, refuses the connection with
// Status and Message.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return strconv.Itoa(e.Status) + " " + e.Message }

// Authenticate runs the Connect hook for r, bounded by ConnectTimeout. A
// refusal comes back as an HTTP status and a message for the response
// (status 0: accepted, with the user data).
func (n *Node) Authenticate(r *http.Request) (userData any, status int, msg string) {
	h := n.cfg.Hooks.Connect
	if h == nil {
		return nil, 0, ""
	}
	ctx, cancel := context.WithTimeout(r.Context(), n.cfg.ConnectTimeout)
	defer cancel()
	type result struct {
		ud  any
		err error
	}
	ch := make(chan result, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				ch <- result{err: fmt.Errorf("connect hook panicked: %v", p)}
			}
		}()
		ud, err := h(r.WithContext(ctx))
		ch <- result{ud, err}
	}()
	select {
	case res := <-ch:
		var se *StatusError
		switch {
		case res.err == nil:
			return res.ud, 0, ""
		case errors.Is(res.err, ErrUnauthorized):
			return nil, http.StatusUnauthorized, "Unauthorized"
		case errors.As(res.err, &se):
			return nil, se.Status, se.Message
		default:
			n.log.Error("connect hook failed", "err", res.err)
			return nil, http.StatusInternalServerError, "Internal Server Error"
		}
	case <-ctx.Done():
		return nil, http.StatusGatewayTimeout, "Connect timed out"
	}
}

// maxBatch is the most calls one {"batch":[...]} may carry (svelte-realtime's cap).
const maxBatch = 50

// inbound is every field of every client frame the protocol understands.
type inbound struct {
	Type       string          `json:"type"`
	Topic      *string         `json:"topic"`
	Since      json.RawMessage `json:"since"`
	Epoch      string          `json:"epoch"`
	Ref        json.RawMessage `json:"ref"`
	RPC        *string         `json:"rpc"`
	ID         json.RawMessage `json:"id"`
	Args       json.RawMessage `json:"args"`
	Batch      json.RawMessage `json:"batch"`
	Sequential bool            `json:"sequential"`
	Token      *string         `json:"token"`
}

// HandleFrame handles one complete client message: protocol frames are
// answered here, anything else goes to the Message hook. data is only read
// during the call.
func (n *Node) HandleFrame(c *Client, data []byte, binary bool) {
	n.metrics.BytesIn.Add(float64(len(data)))
	if !n.inbound(c, len(data)) {
		return
	}
	if !binary {
		if t := bytes.TrimLeft(data, " \t\r\n"); len(t) > 0 && t[0] == '{' {
			var m inbound
			err := json.Unmarshal(t, &m)
			if _, isType := err.(*json.UnmarshalTypeError); err == nil || isType {
				if n.control(c, &m) {
					return
				}
			}
		}
	}
	n.metrics.kindMessage.Inc()
	if h := n.cfg.Hooks.Message; h != nil {
		h(c, bytes.Clone(data), binary)
		return
	}
	n.metrics.InvalidFrames.WithLabelValues("unhandled").Inc()
}

// control handles a protocol frame and reports whether it was one.
func (n *Node) control(c *Client, m *inbound) bool {
	switch {
	case m.Topic != nil && m.Type == "subscribe":
		n.metrics.kindSubscribe.Inc()
		n.subscribeFrame(c, *m.Topic, m.Ref, m.Since, m.Epoch)
	case m.Topic != nil && m.Type == "unsubscribe":
		n.metrics.kindUnsubscribe.Inc()
		n.Unsubscribe(c, *m.Topic)
		if len(m.Ref) > 0 {
			n.sendControl(c, "unsubscribed", *m.Topic, m.Ref, "")
		}
	case m.Topic != nil && m.Type == "replay":
		n.metrics.kindReplay.Inc()
		since, ok := parseSince(m.Since)
		if !ok { // the npm client only sends numbers: refuse rather than guess
			n.metrics.InvalidFrames.WithLabelValues("bad since").Inc()
			return true
		}
		n.replayFrame(c, *m.Topic, since, m.Epoch)
	case m.Token != nil && m.Type == "refresh":
		n.metrics.kindRefresh.Inc()
		n.refreshFrame(c, *m.Token, m.Ref)
	case m.RPC != nil:
		return n.rpcFrame(c, m)
	case len(m.Batch) > 0 && m.Batch[0] == '[':
		n.metrics.kindRPC.Inc()
		n.batchFrame(c, m)
	default:
		return false
	}
	return true
}

// subscribeFrame answers {"type":"subscribe","topic":T[,"since":N[,"epoch":E]][,"ref":R]}.
func (n *Node) subscribeFrame(c *Client, topic string, ref, sinceRaw json.RawMessage, epoch string) {
	if err := ValidateTopic(topic); err != nil {
		n.metrics.InvalidFrames.WithLabelValues("bad topic").Inc()
		n.deny(c, topic, ref, CodeInvalidTopic)
		return
	}
	if directTopic(topic) { // answered with sends only: nothing to subscribe to
		n.ack(c, topic, ref)
		return
	}
	if internalTopic(topic) {
		n.deny(c, topic, ref, CodeForbidden)
		return
	}
	if h := n.cfg.Hooks.Subscribe; h != nil {
		if err := h(c, topic); err != nil {
			n.deny(c, topic, ref, refusalCode(err))
			return
		}
	}
	if !c.Subscribed(topic) && n.topicsFull(c) {
		n.deny(c, topic, ref, CodeLimitExceeded)
		return
	}
	if len(sinceRaw) > 0 && string(sinceRaw) != "null" {
		since, ok := parseSince(sinceRaw)
		if !ok {
			n.metrics.InvalidFrames.WithLabelValues("bad since").Inc()
			n.deny(c, topic, ref, CodeInvalidRequest)
			return
		}
		// History reads wait on the store: Resume queues them, off the
		// transport's reading goroutine, within the connection's limits.
		err := n.Resume(c.Context(), c, ResumeRequest{Topic: topic, Since: since, Epoch: epoch, Subscribe: true},
			func(_ ResumeResult, err error) {
				if err != nil {
					n.log.Warn("subscribe failed", "topic", topic, "err", err)
					n.deny(c, topic, ref, CodeInternal)
					return
				}
				n.ack(c, topic, ref)
			})
		if err != nil {
			n.deny(c, topic, ref, refusalCode(err))
		}
		return
	}
	if err := n.Subscribe(c, topic); err != nil {
		n.log.Warn("subscribe failed", "topic", topic, "err", err)
		n.deny(c, topic, ref, CodeInternal)
		return
	}
	n.ack(c, topic, ref)
}

// replayFrame answers {"type":"replay","topic":T,"since":N[,"epoch":E]}:
// "msg" events on __replay:T, then "end" (at once when no history is kept;
// with the error code when the connection's resume limits refuse it).
func (n *Node) replayFrame(c *Client, topic string, since uint64, epoch string) {
	if err := ValidateTopic(topic); err != nil {
		n.metrics.InvalidFrames.WithLabelValues("bad topic").Inc()
		return
	}
	// A replay reads what a subscribe would deliver: the same rule.
	if h := n.cfg.Hooks.Subscribe; h != nil && !directTopic(topic) {
		if err := h(c, topic); err != nil {
			code := refusalCode(err)
			n.metrics.Denials.WithLabelValues("replay", code).Inc()
			defer n.denied(c)
			n.sendEnd(c, ReplayTopicPrefix+topic, ResumeResult{Seq: since, Epoch: epoch}, NewLiveError(code, "replay refused"))
			return
		}
	}
	_ = n.Resume(c.Context(), c, ResumeRequest{Topic: topic, Since: since, Epoch: epoch}, func(_ ResumeResult, err error) {
		if err != nil {
			n.log.Warn("replay failed", "topic", topic, "err", err)
		}
	})
}

// refusalCode is the code a refusal carries: a LiveError's, else FORBIDDEN.
func refusalCode(err error) string {
	var le *LiveError
	if errors.As(err, &le) {
		return le.Code
	}
	return CodeForbidden
}

// InternalTopicPrefix starts topics that carry instance-to-instance traffic
// (the publish-rate aggregator's "__pressure:rates"): clients may not
// subscribe to them.
const InternalTopicPrefix = "__pressure:"

func internalTopic(topic string) bool { return strings.HasPrefix(topic, InternalTopicPrefix) }

// directTopic reports topics that only ever carry direct sends to one
// connection (RPC answers, replays): subscribing to them is a no-op.
func directTopic(topic string) bool {
	return topic == RPCTopic || strings.HasPrefix(topic, ReplayTopicPrefix)
}

func (n *Node) ack(c *Client, topic string, ref json.RawMessage) {
	if len(ref) > 0 {
		n.sendControl(c, "subscribed", topic, ref, "")
	}
}

// deny tells the client its subscribe was refused, as svelte-adapter-uws
// 0.5 clients expect ({"type":"subscribe-denied",...}); older clients
// ignore it.
func (n *Node) deny(c *Client, topic string, ref json.RawMessage, reason string) {
	n.metrics.Denials.WithLabelValues("subscribe", reason).Inc()
	defer n.denied(c)
	n.sendControl(c, "subscribe-denied", topic, ref, reason)
}

// sendControl sends a protocol control frame ({"type":...}) to c; it is
// never dropped for backpressure.
func (n *Node) sendControl(c *Client, typ, topic string, ref json.RawMessage, reason string) {
	b, err := json.Marshal(struct {
		Type   string          `json:"type"`
		Topic  string          `json:"topic"`
		Ref    json.RawMessage `json:"ref,omitempty"`
		Reason string          `json:"reason,omitempty"`
	}{typ, topic, ref, reason})
	if err != nil { // ref is raw client JSON and already parsed: cannot fail
		return
	}
	c.transport.Deliver(NewMessage("", 0, b)) // Topic "": a control frame
}

func parseSince(raw json.RawMessage) (uint64, bool) {
	if len(raw) == 0 || string(raw) == "null" {
		return 0, true
	}
	s := string(raw)
	if f, err := strconv.ParseFloat(s, 64); err == nil && f >= 0 && f == float64(uint64(f)) {
		return uint64(f), true
	}
	return 0, false
}

// rpcFrame handles {"rpc":PATH,"id":ID,"args":[...]}; a frame whose id is
// neither absent nor a string is not an RPC (svelte-realtime does the same).
func (n *Node) rpcFrame(c *Client, m *inbound) bool {
	call := &Call{Client: c, Path: *m.RPC}
	volatile := len(m.ID) == 0
	if !volatile {
		if err := json.Unmarshal(m.ID, &call.ID); err != nil || call.ID == "" {
			return false
		}
	}
	n.metrics.kindRPC.Inc()
	res := n.executeFrame(call, m.Args)
	if !volatile {
		_ = n.SendRPCResult(c, call.ID, res)
	}
	return true
}

func (n *Node) executeFrame(call *Call, args json.RawMessage) RPCResult {
	if !n.allowRPC(call.Client) {
		le := RateLimitedError(time.Second)
		return RPCResult{ID: call.ID, Code: le.Code, Error: "Too many calls", RetryAfter: le.RetryAfter}
	}
	if len(args) > 0 && string(args) != "null" {
		if err := json.Unmarshal(args, &call.Args); err != nil {
			return RPCResult{ID: call.ID, Code: CodeInvalidRequest, Error: "args must be an array"}
		}
	}
	return n.Execute(call.Client.Context(), call)
}

// batchFrame handles {"batch":[{rpc,id,args},...],"sequential":bool}.
func (n *Node) batchFrame(c *Client, m *inbound) {
	var calls []struct {
		RPC  *string         `json:"rpc"`
		ID   *string         `json:"id"`
		Args json.RawMessage `json:"args"`
	}
	if err := json.Unmarshal(m.Batch, &calls); err != nil {
		_ = n.SendRPCResult(c, "__batch", map[string]any{"batch": []RPCResult{
			{Code: CodeInvalidRequest, Error: "Each batch entry requires rpc and id"}}})
		return
	}
	if len(calls) > maxBatch {
		_ = n.SendRPCResult(c, "__batch", map[string]any{"batch": []RPCResult{
			{Code: CodeInvalidRequest, Error: "Batch exceeds maximum of 50 calls"}}})
		return
	}
	results := make([]RPCResult, len(calls))
	run := func(i int) {
		k := calls[i]
		if k.RPC == nil || k.ID == nil {
			id := ""
			if k.ID != nil {
				id = *k.ID
			}
			results[i] = RPCResult{ID: id, Code: CodeInvalidRequest, Error: "Each batch entry requires rpc and id"}
			return
		}
		results[i] = n.executeFrame(&Call{Client: c, Path: *k.RPC, ID: *k.ID}, k.Args)
	}
	if m.Sequential {
		for i := range calls {
			run(i)
		}
	} else {
		var wg sync.WaitGroup
		for i := range calls {
			wg.Go(func() { run(i) })
		}
		wg.Wait()
	}
	_ = n.SendRPCResult(c, "__batch", map[string]any{"batch": results})
}

// HasConnectHook reports whether connections are authenticated by a
// Connect hook (transports then accept requests without an Origin).
func (n *Node) HasConnectHook() bool { return n.cfg.Hooks.Connect != nil }
