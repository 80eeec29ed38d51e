package redis_test

import (
	"context"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
)

// TestPublishRateAggregator: the cluster publish-rate aggregator runs on
// the Redis broker's system topic like on any backend: instance A's hot
// topic shows up in instance B's merged top publishers.
func TestPublishRateAggregator(t *testing.T) {
	url := needRedis(t)
	prefix := fabrictest.TestPrefix(t)
	t.Cleanup(func() { dropPrefix(t, url, prefix, ":*") })
	var nodes []*fabric.Node
	var aggs []*admission.Aggregator
	for i := range 2 {
		b := newBackend(t, redis.Options{URL: url, Prefix: prefix})
		n, err := fabric.NewNode(fabric.Config{Broker: b.Broker(),
			Pressure: fabric.PressureOptions{SampleInterval: 50 * time.Millisecond, MemoryLimit: -1}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		a, err := admission.NewAggregator(admission.AggregatorOptions{PublishInterval: 100 * time.Millisecond,
			StaleAfter: time.Second, InstanceID: string(rune('a' + i))})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Activate(n); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Deactivate)
		nodes, aggs = append(nodes, n), append(aggs, a)
	}
	ctx := context.Background()
	fabrictest.WaitFor(t, 15*time.Second, "a's hot topic in b's top publishers", func() bool {
		for range 50 {
			if _, err := nodes[0].Publish(ctx, "hot", "m", 1); err != nil {
				t.Fatal(err)
			}
		}
		for _, r := range aggs[1].TopPublishers() {
			if r.Topic == "hot" && r.MessagesPerSec > 0 {
				return true
			}
		}
		return false
	})
}
