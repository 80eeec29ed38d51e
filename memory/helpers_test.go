package memory_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
)

// recorder is a fabric.Transport that keeps every message delivered to it.
type recorder struct {
	mu   sync.Mutex
	msgs []*fabric.Message
}

func (r *recorder) Deliver(m *fabric.Message) bool {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
	return true
}

func (r *recorder) Close(int, string) {}

// payloads returns the envelopes delivered so far.
func (r *recorder) payloads() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, len(r.msgs))
	for i, m := range r.msgs {
		out[i] = string(m.Payload)
	}
	return out
}

// waitFor polls cond until it holds, failing the test after 5s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func newBackend(t *testing.T, o memory.Options) *memory.Backend {
	t.Helper()
	b := memory.New(o)
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// newNode returns a Node on b with its own Broker and b's History.
func newNode(t *testing.T, b *memory.Backend) *fabric.Node {
	t.Helper()
	br := b.Broker()
	n, err := fabric.NewNode(fabric.Config{Broker: br, History: b.History()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close(); _ = br.Close() })
	return n
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func joinLines(s []string) string { return strings.Join(s, "\n") }
