package memory_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/fabricrt/fabric/memory"
)

type nopReceiver struct{}

func (nopReceiver) Receive([]byte, uint64, uint64) {}

// BenchmarkPublish: plain publishes to 1,000 topics with two subscribers
// each (two Nodes), from every core.
func BenchmarkPublish(b *testing.B) {
	be := memory.New(memory.Options{})
	defer be.Close()
	topics := make([]string, 1000)
	for i := range topics {
		topics[i] = fmt.Sprintf("t%d", i)
		for range 2 {
			if _, err := be.Broker().Subscribe(topics[i], nopReceiver{}); err != nil {
				b.Fatal(err)
			}
		}
	}
	br, env := be.Broker(), []byte(`{"topic":"t","event":"e","data":1}`)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			_ = br.Publish(context.Background(), topics[i%len(topics)], env)
			i++
		}
	})
}

// BenchmarkAppend: history appends to 1,000 topics with one subscriber
// each, from every core.
func BenchmarkAppend(b *testing.B) {
	be := memory.New(memory.Options{})
	defer be.Close()
	topics := make([]string, 1000)
	for i := range topics {
		topics[i] = fmt.Sprintf("t%d", i)
		if _, err := be.Broker().Subscribe(topics[i], nopReceiver{}); err != nil {
			b.Fatal(err)
		}
	}
	h, env := be.History(), []byte(`{"topic":"t","event":"e","data":1}`)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := h.Append(context.Background(), topics[i%len(topics)], env, ""); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}
