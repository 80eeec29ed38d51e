package jetstream_test

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestReplayFlood: anonymous connections flood the instance with history
// replays of cold topics (each one a store read) while good clients follow
// a persistent and a plain topic. The resume limits answer the excess with
// RATE_LIMITED, history reads stay capped, the instance's NATS connection
// is never cut, memory stays bounded and the good clients lose nothing.
//
// It floods for 3s in the test command; FABRIC_FLOOD=10s (make flood) runs
// the full ten seconds of the target.
func TestReplayFlood(t *testing.T) {
	dur := 3 * time.Second
	if v := os.Getenv("FABRIC_FLOOD"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("FABRIC_FLOOD=%q: %v", v, err)
		}
		dur = d
	}
	const flooders, coldTopics = 10, 200
	inst := fabrictest.NewInstance(t, withHistory(fabrictest.Options{Node: fabric.Config{ReplayCache: -1}},
		jetstream.HistoryOptions{Eager: true}, "log:*", "good:persist"))
	ctx := testCtx(t, dur+120*time.Second)
	for i := range coldTopics {
		for j := range 20 {
			if _, err := inst.Node.Publish(ctx, fmt.Sprintf("log:%d", i), "m", j); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Good clients: a persistent topic and a plain one.
	goodTopics := []string{"good:persist", "good:plain"}
	type good struct {
		c    *wsclient.Client
		seen map[string]int
	}
	var goods []*good
	for range 3 {
		g := &good{c: inst.Dial(wsclient.Options{Buffer: 1 << 16}), seen: map[string]int{}}
		for _, topic := range goodTopics {
			if err := g.c.Subscribe(ctx, topic); err != nil {
				t.Fatal(err)
			}
		}
		goods = append(goods, g)
	}

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()

	stop := make(chan struct{})
	var sent, refused, answered atomic.Int64
	var wg sync.WaitGroup
	for f := range flooders {
		c := inst.Dial(wsclient.Options{Buffer: 1 << 12})
		wg.Go(func() { // read everything the server answers
			for {
				select {
				case e := <-c.Events():
					if e.Event == "end" {
						answered.Add(1)
						if strings.Contains(string(e.Data), `"error":"RATE_LIMITED"`) {
							refused.Add(1)
						}
					}
				case <-stop:
					return
				}
			}
		})
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				frame := fmt.Appendf(nil, `{"type":"replay","topic":"log:%d","since":1}`, (f*7919+i)%coldTopics)
				if err := c.SendRaw(frame); err != nil {
					return
				}
				sent.Add(1)
			}
		})
	}

	// Sample the heap and goroutines during the flood.
	var peakHeap uint64
	peakGoroutines := goroutines
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				peakHeap = max(peakHeap, ms.HeapInuse)
				peakGoroutines = max(peakGoroutines, runtime.NumGoroutine())
			}
		}
	}()
	// Publish to the good topics during the flood.
	published := 0
	for deadline := time.Now().Add(dur); time.Now().Before(deadline); published++ {
		for _, topic := range goodTopics {
			if _, err := inst.Node.Publish(ctx, topic, "m", published); err != nil {
				t.Fatalf("publish during the flood: %v", err)
			}
		}
	}
	close(stop)
	wg.Wait()
	<-sampled
	goroutinesDuring := peakGoroutines

	for gi, g := range goods {
		fabrictest.WaitFor(t, 30*time.Second, fmt.Sprintf("good client %d to get every message", gi), func() bool {
			for {
				select {
				case e := <-g.c.Events():
					if e.Event == "m" {
						var n int
						if err := json.Unmarshal(e.Data, &n); err != nil || n != g.seen[e.Topic] {
							t.Fatalf("good client %d on %s: got %s, want %d (a message lost or out of order)", gi, e.Topic, e.Data, g.seen[e.Topic])
						}
						g.seen[e.Topic]++
					}
				default:
					return g.seen[goodTopics[0]] == published && g.seen[goodTopics[1]] == published
				}
			}
		})
	}
	growth := int64(peakHeap) - int64(before.HeapInuse)
	t.Logf("%s flood, %d connections: %d replay requests sent, %d answered (%d refused RATE_LIMITED); good clients got all %d messages of each topic; heap in use +%.1f MiB at peak; goroutines %d → %d; NATS reconnects %d",
		dur, flooders, sent.Load(), answered.Load(), refused.Load(), published, float64(growth)/(1<<20), goroutines, goroutinesDuring, inst.NC.Stats().Reconnects)
	if r := inst.NC.Stats().Reconnects; r != 0 {
		t.Fatalf("the instance's NATS connection was cut %d times during the flood", r)
	}
	if published < 5 {
		t.Fatalf("only %d publishes to the good topics during the flood", published)
	}
	if refused.Load() == 0 {
		t.Fatalf("no replay was refused (%d sent, %d answered)", sent.Load(), answered.Load())
	}
	if growth > 256<<20 {
		t.Fatalf("heap grew %.0f MiB during the flood, want < 256 MiB", float64(growth)/(1<<20))
	}
	if goroutinesDuring > goroutines+4*flooders+100 {
		t.Fatalf("goroutines grew from %d to %d during the flood", goroutines, goroutinesDuring)
	}

}
