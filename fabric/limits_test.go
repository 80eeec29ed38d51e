package fabric

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestLimits: each per-connection limit refuses or closes as documented.
func TestLimits(t *testing.T) {
	n, err := NewNode(Config{Broker: nopBroker{}, Limits: Limits{MaxTopics: 3, RPCRate: 1, RPCBurst: 2, FrameRate: 1, FrameBurst: 50, MaxDenials: 5}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	n.HandleRPC("x/y", func(context.Context, *Call) (any, error) { return 1, nil })

	tr := newRecordingTransport()
	c := n.Connect(tr, nil, "test")
	for i := range 4 {
		n.HandleFrame(c, fmt.Appendf(nil, `{"type":"subscribe","topic":"t%d","ref":%d}`, i, i), false)
	}
	if got := len(c.Topics()); got != 3 {
		t.Fatalf("%d topics after 4 subscribes with MaxTopics 3", got)
	}
	if m := waitFrame(t, tr, "subscribe-denied"); m["reason"] != CodeLimitExceeded {
		t.Fatalf("the 4th subscribe: %v, want LIMIT_EXCEEDED", m)
	}
	n.HandleFrame(c, []byte(`{"type":"subscribe","topic":"t0","ref":9}`), false) // already held: fine
	for i := range 3 {
		n.HandleFrame(c, fmt.Appendf(nil, `{"rpc":"x/y","id":"r%d","args":[]}`, i), false)
	}
	tr.mu.Lock()
	rpc := strings.Join(tr.frames, "\n")
	tr.mu.Unlock()
	if strings.Count(rpc, `"ok":true`) != 2 || !strings.Contains(rpc, `"code":"RATE_LIMITED"`) {
		t.Fatalf("3 calls with RPCBurst 2: %s", rpc)
	}

	// Denials past MaxDenials close with 4403.
	d := newRecordingTransport()
	dc := n.Connect(d, nil, "test")
	for i := range 8 {
		n.HandleFrame(dc, fmt.Appendf(nil, `{"type":"subscribe","topic":"bad\u0001%d"}`, i), false)
	}
	select {
	case <-d.closed:
		if d.code != CloseForbidden {
			t.Fatalf("closed with %d, want %d", d.code, CloseForbidden)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not closed after more denials than MaxDenials")
	}

	// A burst of frames past FrameBurst closes with 4429.
	f := newRecordingTransport()
	fc := n.Connect(f, nil, "test")
	for range 60 {
		n.HandleFrame(fc, []byte(`{"type":"unsubscribe","topic":"x"}`), false)
	}
	select {
	case <-f.closed:
		if f.code != CloseRateLimited {
			t.Fatalf("closed with %d, want %d", f.code, CloseRateLimited)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not closed past FrameBurst")
	}
}
