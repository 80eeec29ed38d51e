package backendtest

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// subscribeAll subscribes a new recording connection of each node to topic
// and waits until a publish from every node reaches every one of them (a
// backend may take a moment to spread interest).
func subscribeAll(t *testing.T, nodes []*fabric.Node, topic string) []*recorder {
	t.Helper()
	recs := make([]*recorder, len(nodes))
	for i, n := range nodes {
		recs[i] = newRecorder()
		if err := n.Subscribe(n.Connect(recs[i], nil, "test"), topic); err != nil {
			t.Fatal(err)
		}
	}
	ctx := ctxFor(t, 30*time.Second)
	for i, from := range nodes {
		event := fmt.Sprintf("probe-%d", i)
		waitFor(t, 20*time.Second, "interest in "+topic+" to reach every instance", func() bool {
			if _, err := from.Publish(ctx, topic, event, nil); err != nil {
				t.Fatal(err)
			}
			for _, r := range recs {
				if !slices.ContainsFunc(r.on(topic), func(m received) bool { return m.Event == event }) {
					return false
				}
			}
			return true
		})
	}
	return recs
}

// testPubSub: concurrent publishers on two instances; every subscriber on
// every instance gets every message once, each publisher's in its order.
func testPubSub(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	nodes := []*fabric.Node{node(t, d.Instance(t), nil), node(t, d.Instance(t), nil)}
	const topic, publishers, each = "chat:pubsub", 4, 500
	recs := subscribeAll(t, nodes, topic)
	other := newRecorder()
	if err := nodes[1].Subscribe(nodes[1].Connect(other, nil, "test"), "chat:other"); err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t, 60*time.Second)
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			n := nodes[p%len(nodes)]
			for i := range each {
				if _, err := n.Publish(ctx, topic, "m", map[string]int{"p": p, "i": i}); err != nil {
					t.Errorf("publisher %d: %v", p, err)
					return
				}
			}
		})
	}
	wg.Wait()
	for ri, r := range recs {
		got := r.waitOn(t, 30*time.Second, topic, "every message", func(ms []received) bool { return count(ms, "m") >= publishers*each })
		next := make([]int, publishers)
		for _, m := range got {
			if m.Event != "m" {
				continue
			}
			var v struct{ P, I int }
			if err := json.Unmarshal(m.Data, &v); err != nil {
				t.Fatalf("subscriber %d: data %s: %v", ri, m.Data, err)
			}
			if v.I != next[v.P] {
				t.Fatalf("subscriber %d: publisher %d's message %d arrived when %d was due (order or loss)", ri, v.P, v.I, next[v.P])
			}
			next[v.P]++
		}
		if c := count(got, "m"); c != publishers*each {
			t.Fatalf("subscriber %d: %d messages, want %d (duplicates)", ri, c, publishers*each)
		}
	}
	if n := len(other.on(topic)); n != 0 {
		t.Fatalf("a subscriber of another topic got %d messages of %s", n, topic)
	}
}

func count(ms []received, event string) int {
	n := 0
	for _, m := range ms {
		if m.Event == event {
			n++
		}
	}
	return n
}

// testPersistentOrder: stored messages reach every subscriber on every
// instance with their seq, in one increasing order, the seqs Publish
// returned.
func testPersistentOrder(t *testing.T, b Backend) {
	d := b.New(t, Options{})
	nodes := []*fabric.Node{node(t, d.Instance(t), all), node(t, d.Instance(t), all)}
	const topic, each = "feed:order", 200
	recs := subscribeAll(t, nodes, topic)
	ctx := ctxFor(t, 60*time.Second)
	var mu sync.Mutex
	var published []uint64
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() {
			for i := range each {
				seq, err := n.Publish(ctx, topic, "m", i)
				if err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				if seq == 0 {
					t.Errorf("a persistent publish returned seq 0")
					return
				}
				mu.Lock()
				published = append(published, seq)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.Sort(published)
	var first []uint64
	for ri, r := range recs {
		got := r.waitOn(t, 30*time.Second, topic, "every stored message", func(ms []received) bool { return count(ms, "m") >= len(published) })
		var ss []uint64
		for _, m := range got {
			if m.Event == "m" {
				ss = append(ss, m.Seq)
			}
		}
		if !slices.Equal(ss, published) {
			t.Fatalf("subscriber %d got seqs %v..., want the published %v... (%d vs %d)", ri, head(ss), head(published), len(ss), len(published))
		}
		if first == nil {
			first = ss
		} else if !slices.Equal(first, ss) {
			t.Fatalf("subscribers saw different orders")
		}
	}
}

func head(s []uint64) []uint64 {
	if len(s) > 8 {
		return s[:8]
	}
	return s
}
