package wsedge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"

	"github.com/fabricrt/fabric/fabric"
)

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
}

// dispatch routes one client message: protocol frames are handled here,
// anything else goes to the Message hook.
func (c *conn) dispatch(data []byte, binary bool) {
	if !binary {
		if t := bytes.TrimLeft(data, " \t\r\n"); len(t) > 0 && t[0] == '{' {
			var m inbound
			err := json.Unmarshal(t, &m)
			if _, isType := err.(*json.UnmarshalTypeError); err == nil || isType {
				if c.control(&m) {
					return
				}
			}
		}
	}
	c.edge.kindMessage.Inc()
	if h := c.edge.opts.Message; h != nil {
		h(c.client, bytes.Clone(data), binary)
		return
	}
	c.edge.metrics.InvalidFrames.WithLabelValues("unhandled").Inc()
}

// control handles a protocol frame and reports whether it was one.
func (c *conn) control(m *inbound) bool {
	switch {
	case m.Topic != nil && m.Type == "subscribe":
		c.edge.kindSubscribe.Inc()
		c.subscribe(*m.Topic, m.Ref, m.Since, m.Epoch)
	case m.Topic != nil && m.Type == "unsubscribe":
		c.edge.kindUnsubscribe.Inc()
		c.edge.node.Unsubscribe(c.client, *m.Topic)
		if len(m.Ref) > 0 {
			c.sendControl("unsubscribed", *m.Topic, m.Ref, "")
		}
	case m.Topic != nil && m.Type == "replay":
		c.edge.kindReplay.Inc()
		since, ok := parseSince(m.Since)
		if !ok { // the npm client only sends numbers: refuse rather than guess
			c.edge.metrics.InvalidFrames.WithLabelValues("bad since").Inc()
			return true
		}
		c.replay(*m.Topic, since, m.Epoch)
	case m.RPC != nil:
		return c.rpc(m)
	case len(m.Batch) > 0 && m.Batch[0] == '[':
		c.edge.kindRPC.Inc()
		c.batch(m)
	default:
		return false
	}
	return true
}

// subscribe answers {"type":"subscribe","topic":T[,"since":N[,"epoch":E]][,"ref":R]}.
func (c *conn) subscribe(topic string, ref, sinceRaw json.RawMessage, epoch string) {
	if err := fabric.ValidateTopic(topic); err != nil {
		c.edge.metrics.InvalidFrames.WithLabelValues("bad topic").Inc()
		c.deny(topic, ref, fabric.CodeInvalidTopic)
		return
	}
	if directTopic(topic) { // answered with Send only: nothing to subscribe to
		c.ack(topic, ref)
		return
	}
	if h := c.edge.opts.Subscribe; h != nil && !h(c.client, topic) {
		c.deny(topic, ref, fabric.CodeForbidden)
		return
	}
	if len(sinceRaw) > 0 && string(sinceRaw) != "null" {
		since, ok := parseSince(sinceRaw)
		if !ok {
			c.edge.metrics.InvalidFrames.WithLabelValues("bad since").Inc()
			c.deny(topic, ref, fabric.CodeInvalidRequest)
			return
		}
		// History reads wait on the store: the node queues them, off the
		// reading goroutine, within the connection's resume limits.
		err := c.edge.node.Resume(c.ctx(), c.client, fabric.ResumeRequest{Topic: topic, Since: since, Epoch: epoch, Subscribe: true},
			func(_ fabric.ResumeResult, err error) {
				if err != nil {
					c.edge.log.Warn("subscribe failed", "topic", topic, "err", err)
					c.deny(topic, ref, fabric.CodeInternal)
					return
				}
				c.ack(topic, ref)
			})
		if err != nil {
			c.deny(topic, ref, denyCode(err))
		}
		return
	}
	if err := c.edge.node.Subscribe(c.client, topic); err != nil {
		c.edge.log.Warn("subscribe failed", "topic", topic, "err", err)
		c.deny(topic, ref, fabric.CodeInternal)
		return
	}
	c.ack(topic, ref)
}

// directTopic reports topics that only ever carry direct sends to one
// connection (RPC answers, replays): subscribing to them is a no-op.
func directTopic(topic string) bool {
	return topic == fabric.RPCTopic || strings.HasPrefix(topic, fabric.ReplayTopicPrefix)
}

func (c *conn) ack(topic string, ref json.RawMessage) {
	if len(ref) > 0 {
		c.sendControl("subscribed", topic, ref, "")
	}
}

// deny tells the client its subscribe was refused, as svelte-adapter-uws
// 0.5 clients expect ({"type":"subscribe-denied",...}); older clients ignore it.
func (c *conn) deny(topic string, ref json.RawMessage, reason string) {
	c.sendControl("subscribe-denied", topic, ref, reason)
}

func (c *conn) sendControl(typ, topic string, ref json.RawMessage, reason string) {
	b, err := json.Marshal(struct {
		Type   string          `json:"type"`
		Topic  string          `json:"topic"`
		Ref    json.RawMessage `json:"ref,omitempty"`
		Reason string          `json:"reason,omitempty"`
	}{typ, topic, ref, reason})
	if err != nil { // ref is raw client JSON and already parsed: cannot fail
		return
	}
	c.enqueue(fabric.NewMessage("", 0, b).Frame, true)
}

// replay answers {"type":"replay","topic":T,"since":N[,"epoch":E]}: "msg"
// events on __replay:T, then "end" (at once when no history is kept).
func (c *conn) replay(topic string, since uint64, epoch string) {
	if err := fabric.ValidateTopic(topic); err != nil {
		c.edge.metrics.InvalidFrames.WithLabelValues("bad topic").Inc()
		return
	}
	// Refused (rate, queue): the node has answered with an "end" carrying
	// the error code.
	_ = c.edge.node.Resume(c.ctx(), c.client, fabric.ResumeRequest{Topic: topic, Since: since, Epoch: epoch}, func(_ fabric.ResumeResult, err error) {
		if err != nil {
			c.edge.log.Warn("replay failed", "topic", topic, "err", err)
		}
	})
}

// denyCode is the reason a refused subscribe carries: a LiveError's code,
// else INTERNAL_ERROR.
func denyCode(err error) string {
	var le *fabric.LiveError
	if errors.As(err, &le) {
		return le.Code
	}
	return fabric.CodeInternal
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

// rpc handles {"rpc":PATH,"id":ID,"args":[...]}; a frame whose id is neither
// absent nor a string is not an RPC (svelte-realtime does the same).
func (c *conn) rpc(m *inbound) bool {
	call := &fabric.Call{Client: c.client, Path: *m.RPC}
	volatile := len(m.ID) == 0
	if !volatile {
		if err := json.Unmarshal(m.ID, &call.ID); err != nil || call.ID == "" {
			return false
		}
	}
	c.edge.kindRPC.Inc()
	res := c.execute(call, m.Args)
	if !volatile {
		_ = c.edge.node.SendRPCResult(c.client, call.ID, res)
	}
	return true
}

func (c *conn) execute(call *fabric.Call, args json.RawMessage) fabric.RPCResult {
	if len(args) > 0 && string(args) != "null" {
		if err := json.Unmarshal(args, &call.Args); err != nil {
			return fabric.RPCResult{ID: call.ID, Code: fabric.CodeInvalidRequest, Error: "args must be an array"}
		}
	}
	return c.edge.node.Execute(c.ctx(), call)
}

// batch handles {"batch":[{rpc,id,args},...],"sequential":bool}.
func (c *conn) batch(m *inbound) {
	var calls []struct {
		RPC  *string         `json:"rpc"`
		ID   *string         `json:"id"`
		Args json.RawMessage `json:"args"`
	}
	if err := json.Unmarshal(m.Batch, &calls); err != nil {
		_ = c.edge.node.SendRPCResult(c.client, "__batch", map[string]any{"batch": []fabric.RPCResult{
			{Code: fabric.CodeInvalidRequest, Error: "Each batch entry requires rpc and id"}}})
		return
	}
	if len(calls) > maxBatch {
		_ = c.edge.node.SendRPCResult(c.client, "__batch", map[string]any{"batch": []fabric.RPCResult{
			{Code: fabric.CodeInvalidRequest, Error: "Batch exceeds maximum of 50 calls"}}})
		return
	}
	results := make([]fabric.RPCResult, len(calls))
	run := func(i int) {
		k := calls[i]
		if k.RPC == nil || k.ID == nil {
			id := ""
			if k.ID != nil {
				id = *k.ID
			}
			results[i] = fabric.RPCResult{ID: id, Code: fabric.CodeInvalidRequest, Error: "Each batch entry requires rpc and id"}
			return
		}
		results[i] = c.execute(&fabric.Call{Client: c.client, Path: *k.RPC, ID: *k.ID}, k.Args)
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
	_ = c.edge.node.SendRPCResult(c.client, "__batch", map[string]any{"batch": results})
}

// ctx is the connection's context, cancelled when it ends.
func (c *conn) ctx() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cctx == nil {
		c.cctx, c.cancel = context.WithCancel(context.Background())
		if c.closed {
			c.cancel()
		}
	}
	return c.cctx
}
