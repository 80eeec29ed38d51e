package sse

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// queueEntryCost is what one queued message costs a stream besides its
// bytes (its slot in the queue), counted against MaxBackpressure.
const queueEntryCost = 8

// position is where a stream stands on one persistent topic.
type position struct {
	seq   uint64
	epoch string
}

// conn is one SSE stream: a fabric.Transport. Deliver queues; the request's
// goroutine (run) writes.
type conn struct {
	h      *Handler
	id     string
	client *fabric.Client

	mu      sync.Mutex
	q       []*fabric.Message
	queued  int
	closing bool
	code    int
	reason  string
	wake    chan struct{}
	cutCh   chan struct{}
	cutOnce sync.Once

	// owned by run
	pos map[string]position
	buf []byte
}

func newConn(h *Handler, resume map[string]position) *conn {
	c := &conn{h: h, id: newSessionID(), wake: make(chan struct{}, 1), cutCh: make(chan struct{}), pos: map[string]position{}}
	for t, p := range resume {
		c.pos[t] = p
	}
	return c
}

// Deliver implements fabric.Transport: it queues m, or drops it past
// MaxBackpressure.
func (c *conn) Deliver(m *fabric.Message) bool {
	n := len(m.Payload) + queueEntryCost
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		c.h.metrics.Dropped.WithLabelValues("closed").Inc()
		return false
	}
	if c.queued > 0 && c.queued+n > c.h.opts.MaxBackpressure {
		c.mu.Unlock()
		c.h.metrics.Dropped.WithLabelValues("backpressure").Inc()
		return false
	}
	c.q = append(c.q, m)
	c.queued += n
	c.mu.Unlock()
	c.signal()
	return true
}

// Close implements fabric.Transport: the queued events, then a "close"
// event with code and reason, then the end of the response.
func (c *conn) Close(code int, reason string) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	c.closing, c.code, c.reason = true, code, reason
	c.mu.Unlock()
	c.signal()
}

// cut ends the stream at once.
func (c *conn) cut() { c.cutOnce.Do(func() { close(c.cutCh) }) }

func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeSession queues the first event: the session id for POSTs.
func (c *conn) writeSession() {
	c.buf = append(c.buf[:0], "retry: 1000\nevent: session\ndata: {\"session\":\""...)
	c.buf = append(c.buf, c.id...)
	c.buf = append(c.buf, "\"}\n\n"...)
}

// run writes events until the stream ends and returns its close code.
func (c *conn) run(ctx context.Context, w http.ResponseWriter, rc *http.ResponseController) (int, string) {
	hb := time.NewTicker(c.h.opts.Heartbeat)
	defer hb.Stop()
	for {
		var batch []*fabric.Message
		c.mu.Lock()
		batch, c.q, c.queued = c.q, nil, 0
		closing, code, reason := c.closing, c.code, c.reason
		c.mu.Unlock()
		for _, m := range batch {
			c.encode(ctx, m)
		}
		if closing {
			b, _ := json.Marshal(struct {
				Code   int    `json:"code"`
				Reason string `json:"reason"`
			}{code, reason})
			c.buf = append(c.buf, "event: close\ndata: "...)
			c.buf = append(c.buf, b...)
			c.buf = append(c.buf, "\n\n"...)
		}
		if len(c.buf) > 0 {
			if err := c.flush(w, rc); err != nil {
				return 1006, "write failed"
			}
		}
		if closing {
			return code, reason
		}
		select {
		case <-c.wake:
		case <-hb.C:
			c.buf = append(c.buf, ": ping\n\n"...)
		case <-ctx.Done():
			return 1006, "client gone"
		case <-c.cutCh:
			return 1006, "stream cut"
		}
	}
}

func (c *conn) flush(w http.ResponseWriter, rc *http.ResponseController) error {
	_ = rc.SetWriteDeadline(time.Now().Add(c.h.opts.WriteTimeout))
	n, err := w.Write(c.buf)
	if err == nil {
		err = rc.Flush()
	}
	c.h.metrics.BytesOut.Add(float64(n))
	c.h.metrics.Writes.Inc()
	if cap(c.buf) > 64<<10 {
		c.buf = nil // do not keep a burst's buffer for an idle stream
	} else {
		c.buf = c.buf[:0]
	}
	return err
}

// encode appends m as one event: control frames ({"type":...}) are named by
// their type, envelopes by their event; messages of persistent topics (and
// resume ends) move the stream's position, sent as the event's id.
func (c *conn) encode(ctx context.Context, m *fabric.Message) {
	var event []byte
	id := false
	if m.Topic == "" {
		var ctl struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(m.Payload, &ctl)
		event = []byte(ctl.Type)
	} else {
		_, ev, data, ok := fabric.SplitEnvelope(m.Payload)
		if ok {
			event = ev
		}
		switch {
		case m.Seq > 0 && !fabric.IsReserved(m.Topic):
			p := c.pos[m.Topic]
			if p.epoch == "" {
				p.epoch = c.epoch(ctx, m.Topic)
			}
			p.seq = max(p.seq, m.Seq)
			c.pos[m.Topic] = p
			id = true
		case ok && string(ev) == "end" && strings.HasPrefix(m.Topic, fabric.ReplayTopicPrefix):
			var end fabric.ResumeResult
			if json.Unmarshal(data, &end) == nil {
				t := strings.TrimPrefix(m.Topic, fabric.ReplayTopicPrefix)
				p := c.pos[t]
				if end.Epoch != "" && end.Epoch != p.epoch {
					p = position{epoch: end.Epoch}
				}
				p.seq = max(p.seq, end.Seq)
				c.pos[t] = p
				id = true
			}
		}
	}
	if id {
		c.buf = append(c.buf, "id: "...)
		c.buf = append(c.buf, encodePositions(c.pos)...)
		c.buf = append(c.buf, '\n')
	}
	if len(event) > 0 && bytes.IndexAny(event, "\r\n") < 0 {
		c.buf = append(c.buf, "event: "...)
		c.buf = append(c.buf, event...)
		c.buf = append(c.buf, '\n')
	}
	// JSON never needs a raw newline, but data published as is may hold
	// some between its tokens: each line is its own data: field (the
	// client joins them with "\n").
	for p := m.Payload; ; {
		i := bytes.IndexAny(p, "\r\n")
		c.buf = append(c.buf, "data: "...)
		if i < 0 {
			c.buf = append(c.buf, p...)
			c.buf = append(c.buf, '\n')
			break
		}
		c.buf = append(c.buf, p[:i]...)
		c.buf = append(c.buf, '\n')
		p = p[i+1:]
	}
	c.buf = append(c.buf, '\n')
	c.h.metrics.MessagesOut.Inc()
}

// epoch asks the history for topic's epoch (cached by the backend), so
// that the stream's id carries it from the first message on.
func (c *conn) epoch(ctx context.Context, topic string) string {
	h := c.h.node.History()
	if h == nil {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	e, err := h.Epoch(ctx, topic)
	if err != nil {
		return ""
	}
	return e
}

// encodePositions writes every position as a query string:
// topic=seq:epoch&... (keys sorted), the form Last-Event-ID brings back.
func encodePositions(pos map[string]position) string {
	v := make(url.Values, len(pos))
	for t, p := range pos {
		s := strconv.FormatUint(p.seq, 10)
		if p.epoch != "" {
			s += ":" + p.epoch
		}
		v.Set(t, s)
	}
	return v.Encode()
}

// parseResume reads where a reconnecting stream stands: Last-Event-ID (a
// previous stream's id), or ?since= (a number, for the one topic of the
// stream, with ?epoch=; or the query-string form). Positions of topics the
// stream does not name are ignored.
func parseResume(lastEventID, since, epoch string, topics []string) (map[string]position, error) {
	raw := lastEventID
	if raw == "" {
		raw = since
	}
	if raw == "" {
		return nil, nil
	}
	out := map[string]position{}
	if n, err := strconv.ParseUint(raw, 10, 64); err == nil {
		if len(topics) != 1 {
			return nil, fmt.Errorf("a bare since (%d) needs exactly one topic; use topic=seq:epoch pairs", n)
		}
		out[topics[0]] = position{seq: n, epoch: epoch}
		return out, nil
	}
	v, err := url.ParseQuery(raw)
	if err != nil {
		return nil, fmt.Errorf("Last-Event-ID or since %q: %w", clip(raw), err)
	}
	for _, t := range topics {
		s := v.Get(t)
		if s == "" {
			continue
		}
		seqStr, ep, _ := strings.Cut(s, ":")
		n, err := strconv.ParseUint(seqStr, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("position of %q: %q is not a sequence", clip(t), clip(seqStr))
		}
		out[t] = position{seq: n, epoch: ep}
	}
	return out, nil
}

// subscribeFrame is the protocol frame that subscribes a stream's topic,
// resuming from p when it has a position.
func subscribeFrame(topic, ref string, p position) []byte {
	m := map[string]any{"type": "subscribe", "topic": topic, "ref": ref}
	if p.seq > 0 || p.epoch != "" {
		m["since"] = p.seq
		if p.epoch != "" {
			m["epoch"] = p.epoch
		}
	}
	b, _ := json.Marshal(m)
	return b
}

func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}
