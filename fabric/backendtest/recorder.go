package backendtest

import (
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// recorder is a connection's transport that keeps every message delivered
// to it, decoded.
type recorder struct {
	mu     sync.Mutex
	msgs   []received
	notify chan struct{}
}

// received is one delivered envelope.
type received struct {
	Topic string          `json:"topic"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	Seq   uint64          `json:"seq"`
}

func newRecorder() *recorder { return &recorder{notify: make(chan struct{}, 1)} }

// Deliver implements fabric.Transport.
func (r *recorder) Deliver(m *fabric.Message) bool {
	var e received
	if err := json.Unmarshal(m.Payload, &e); err != nil {
		e = received{Topic: "!malformed", Data: json.RawMessage(m.Payload)}
	}
	r.mu.Lock()
	r.msgs = append(r.msgs, e)
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
	return true
}

// Close implements fabric.Transport.
func (r *recorder) Close(int, string) {}

// snapshot returns the messages received so far.
func (r *recorder) snapshot() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.msgs...)
}

// on returns the messages received on topic.
func (r *recorder) on(topic string) []received {
	var out []received
	for _, m := range r.snapshot() {
		if m.Topic == topic {
			out = append(out, m)
		}
	}
	return out
}

// waitOn waits until cond holds for the messages received on topic.
func (r *recorder) waitOn(t *testing.T, d time.Duration, topic, what string, cond func([]received) bool) []received {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		got := r.on(topic)
		if cond(got) {
			return got
		}
		select {
		case <-r.notify:
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s on %s; got %d messages: %s", d, what, topic, len(got), summarize(got))
		}
	}
}

// summarize shows the last few messages of a failing wait.
func summarize(ms []received) string {
	if len(ms) > 6 {
		ms = ms[len(ms)-6:]
	}
	b, _ := json.Marshal(ms)
	return string(b)
}

// seqs returns the seq of each message.
func seqs(ms []received) []uint64 {
	out := make([]uint64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

// endOf decodes a resume's "end" event, if one arrived on topic's replay
// topic.
func endOf(r *recorder, topic string) (fabric.ResumeResult, bool) {
	for _, m := range r.on(fabric.ReplayTopicPrefix + topic) {
		if m.Event == "end" {
			var res fabric.ResumeResult
			_ = json.Unmarshal(m.Data, &res)
			return res, true
		}
	}
	return fabric.ResumeResult{}, false
}
