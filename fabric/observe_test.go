package fabric

import (
	"context"
	"slices"
	"sync"
	"testing"
)

// recorder is an Observer that records what it is told; it holds a slice,
// so it is not comparable (Observe must not compare observers).
type recorder struct {
	mu  *sync.Mutex
	log *[]string
}

func (r recorder) add(s string) { r.mu.Lock(); *r.log = append(*r.log, s); r.mu.Unlock() }

func (r recorder) Connected(c *Client)                          { r.add("connect") }
func (r recorder) Subscribed(c *Client, topic string)           { r.add("sub " + topic) }
func (r recorder) Unsubscribed(c *Client, topic string)         { r.add("unsub " + topic) }
func (r recorder) Disconnected(c *Client)                       { r.add("disconnect") }
func (r recorder) events() []string                             { r.mu.Lock(); defer r.mu.Unlock(); return slices.Clone(*r.log) }
func newRecorder() recorder                                     { return recorder{mu: &sync.Mutex{}, log: &[]string{}} }
func (nopBroker) Publish(context.Context, string, []byte) error { return nil }
func (nopBroker) Subscribe(string, Receiver) (Subscription, error) {
	return nopSub{}, nil
}
func (nopBroker) Close() error { return nil }

type nopBroker struct{}
type nopSub struct{}

func (nopSub) Unsubscribe() error { return nil }

type nopTransport struct{}

func (nopTransport) Deliver(*Message) bool { return true }
func (nopTransport) Close(int, string)     {}

func TestObservers(t *testing.T) {
	n, err := NewNode(Config{Broker: nopBroker{}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := newRecorder(), newRecorder()
	removeA := n.Observe(a)
	n.Observe(b)
	c := n.Connect(nopTransport{}, "u", "127.0.0.1:1")
	if err := n.Subscribe(c, "t1"); err != nil {
		t.Fatal(err)
	}
	_ = n.Subscribe(c, "t1") // already subscribed: not told again
	n.Unsubscribe(c, "t1")
	n.Unsubscribe(c, "t1") // not subscribed: not told
	removeA()
	removeA()
	_ = n.Subscribe(c, "t2")
	n.Disconnect(c, 1000, "")
	n.Disconnect(c, 1000, "")
	if got, want := a.events(), []string{"connect", "sub t1", "unsub t1"}; !slices.Equal(got, want) {
		t.Errorf("removed observer saw %v, want %v", got, want)
	}
	if got, want := b.events(), []string{"connect", "sub t1", "unsub t1", "sub t2", "disconnect"}; !slices.Equal(got, want) {
		t.Errorf("observer saw %v, want %v", got, want)
	}
	if len(n.ID()) != 16 || n.ID() != n.ID() {
		t.Errorf("ID() = %q, want 16 stable hex digits", n.ID())
	}
}

type countTransport struct{ got *[]string }

func (t countTransport) Deliver(m *Message) bool {
	*t.got = append(*t.got, string(m.Payload))
	return true
}
func (countTransport) Close(int, string) {}

// publishBroker fails the test if anything is published through it.
type publishBroker struct {
	nopBroker
	t *testing.T
}

func (b publishBroker) Publish(context.Context, string, []byte) error {
	b.t.Error("PublishLocal went through the broker")
	return nil
}

func TestPublishLocalAndSendEnvelope(t *testing.T) {
	n, _ := NewNode(Config{Broker: publishBroker{t: t}})
	var got1, got2 []string
	c1 := n.Connect(countTransport{&got1}, nil, "")
	c2 := n.Connect(countTransport{&got2}, nil, "")
	_ = n.Subscribe(c1, "__presence:r")
	if k, err := n.PublishLocal("__presence:r", "join", map[string]string{"key": "a"}); err != nil || k != 1 {
		t.Fatalf("PublishLocal reached %d, %v; want 1", k, err)
	}
	if k, _ := n.PublishLocal("nobody", "e", 1); k != 0 {
		t.Fatalf("PublishLocal to a topic without subscribers reached %d", k)
	}
	if _, err := n.PublishLocal("bad\"topic", "e", 1); err == nil {
		t.Fatal("PublishLocal accepted an invalid topic")
	}
	if k := n.SendEnvelope([]*Client{c1, c2}, "t", Envelope("t", "e", []byte("2"))); k != 2 {
		t.Fatalf("SendEnvelope reached %d, want 2", k)
	}
	want1 := []string{`{"topic":"__presence:r","event":"join","data":{"key":"a"}}`, `{"topic":"t","event":"e","data":2}`}
	if !slices.Equal(got1, want1) || !slices.Equal(got2, want1[1:]) {
		t.Fatalf("got %q and %q", got1, got2)
	}
	if c1.Closed() {
		t.Fatal("Closed before Disconnect")
	}
	n.Disconnect(c1, 1000, "")
	if !c1.Closed() {
		t.Fatal("not Closed after Disconnect")
	}
}
