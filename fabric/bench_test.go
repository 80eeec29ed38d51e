package fabric

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// ringTransport stands in for a connection's outbound queue: a mutex and a
// fixed ring of message pointers, the same work a WebSocket connection does
// on Deliver before its flusher writes.
type ringTransport struct {
	mu   sync.Mutex
	ring [64]*Message
	n    int
	got  atomic.Int64
}

func (r *ringTransport) Deliver(m *Message) bool {
	r.mu.Lock()
	r.ring[r.n%len(r.ring)] = m
	r.n++
	r.mu.Unlock()
	r.got.Add(1)
	return true
}

func (r *ringTransport) Close(int, string) {}

// BenchmarkFanout measures the per-instance fan-out of one arriving message
// to 1,000 local subscribers: the envelope is framed once, then the same
// frame is queued to each subscriber. Reports ns and allocations per
// delivery (one op = one message = 1,000 deliveries).
func BenchmarkFanout(b *testing.B) {
	for _, subs := range []int{1_000, 10_000} {
		b.Run(fmt.Sprintf("subscribers=%d", subs), func(b *testing.B) {
			n, err := NewNode(Config{Broker: nopBroker{}})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { n.Close() })
			for range subs {
				c := n.Connect(&ringTransport{}, nil, "bench")
				if err := n.Subscribe(c, "room"); err != nil {
					b.Fatal(err)
				}
			}
			s := n.hub.shard("room")
			s.mu.Lock()
			t := s.topics["room"]
			s.mu.Unlock()
			env := Envelope("room", "msg", []byte(`{"text":"`+string(make128())+`"}`))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				t.Receive(env, 0, 0)
			}
			b.StopTimer()
			d := float64(b.N) * float64(subs)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/d, "ns/delivery")
			b.ReportMetric(d/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}

func make128() []byte {
	p := make([]byte, 100)
	for i := range p {
		p[i] = 'a' + byte(i%26)
	}
	return p
}
