package redis_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/backendtest"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
	"github.com/redis/rueidis"
)

// TestConformance runs the backend conformance suite on one Redis server:
// each deployment is a key prefix of its own on the shared test Redis,
// each instance its own Backend (connection, pub/sub connection, broker,
// history, presence store, limiters, cluster view, leases).
func TestConformance(t *testing.T) {
	url := needRedis(t)
	backendtest.Run(t, backendtest.Backend{Name: "redis", New: deploymentOn(url, true)})
}

// TestConformanceCluster runs the suite on a Redis Cluster of three
// masters started on loopback ports: sharded pub/sub, one connection per
// partition, scripts on one slot each.
func TestConformanceCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	url := startCluster(t, "redis")
	backendtest.Run(t, backendtest.Backend{Name: "redis-cluster", New: deploymentOn(url, false)})
	t.Run("Spread", func(t *testing.T) { testSpread(t, url) })
}

// testSpread: on a cluster the backend uses sharded pub/sub, and the
// partitions' keys land on every master.
func testSpread(t *testing.T, url string) {
	prefix := fabrictest.TestPrefix(t)
	b := newBackend(t, redis.Options{URL: url, Prefix: prefix})
	if !b.Sharded() {
		t.Fatal("not sharded on a cluster")
	}
	ctx := context.Background()
	r := &countReceiver{}
	br := b.Broker()
	for i := range 64 {
		topic := fmt.Sprintf("feed:%d", i)
		if _, err := br.Subscribe(topic, r); err != nil {
			t.Fatal(err)
		}
		if _, err := b.History().Append(ctx, topic, []byte(`{}`), ""); err != nil {
			t.Fatal(err)
		}
	}
	if r.got.Load() != 64 { // Append waits for this instance's subscribers
		t.Fatalf("%d of 64 delivered", r.got.Load())
	}
	perNode := map[string]int{}
	for addr, node := range b.Client().Nodes() {
		keys, err := node.Do(ctx, node.B().Keys().Pattern(prefix+":*").Build()).AsStrSlice()
		if err != nil {
			t.Fatal(err)
		}
		perNode[addr] = len(keys)
	}
	used := 0
	for _, n := range perNode {
		if n > 0 {
			used++
		}
	}
	if used < 3 {
		t.Fatalf("keys per master %v: want every one of the 3 used", perNode)
	}
	t.Logf("keys per master: %v", perNode)
}

// TestConformanceSentinel runs the suite through a Sentinel that monitors
// a throwaway master: the client asks the Sentinel for the master and
// follows it.
func TestConformanceSentinel(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a master and a Sentinel")
	}
	url := startSentinel(t)
	if m := newBackend(t, redis.Options{URL: url}).Client().Mode(); m != rueidis.ClientModeSentinel {
		t.Fatalf("client mode %s, want sentinel", m)
	}
	backendtest.Run(t, backendtest.Backend{Name: "redis-sentinel", New: deploymentOn(url, false)})
}

// TestConformanceValkey runs the suite on Valkey when valkey-server is
// installed (Debian 12 does not package it) or FABRIC_TEST_VALKEY_URL
// names one.
func TestConformanceValkey(t *testing.T) {
	url := os.Getenv("FABRIC_TEST_VALKEY_URL")
	if url == "" {
		if _, err := exec.LookPath("valkey-server"); err != nil {
			t.Skip("no valkey-server (not packaged for this distribution) and no FABRIC_TEST_VALKEY_URL")
		}
		p := &redisProc{dir: t.TempDir(), port: freePort()}
		if err := p.startWith("valkey-server"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.kill)
		url = p.url()
	}
	backendtest.Run(t, backendtest.Backend{Name: "valkey", New: deploymentOn(url, false)})
}

// deploymentOn returns the suite's deployment factory on the Redis at url;
// cleanup deletes the deployment's keys at the end (for a shared Redis).
func deploymentOn(url string, cleanup bool) func(t *testing.T, o backendtest.Options) backendtest.Deployment {
	return func(t *testing.T, o backendtest.Options) backendtest.Deployment {
		d := &deployment{url: url, prefix: fabrictest.TestPrefix(t), opts: o}
		if cleanup {
			t.Cleanup(func() { dropPrefix(t, url, d.prefix, ":*") })
		}
		return d
	}
}

type deployment struct {
	url    string
	prefix string
	opts   backendtest.Options
}

func (d *deployment) Instance(t *testing.T) backendtest.Instance {
	b := newBackend(t, redis.Options{URL: d.url, Prefix: d.prefix, MaxPerTopic: d.opts.MaxPerTopic,
		PresenceSweep: 100 * time.Millisecond})
	return backendtest.Instance{
		Broker:   b.Broker(),
		History:  b.History(),
		Presence: b.PresenceStore(),
		Limiter: func(_ *testing.T, o backendtest.LimiterOptions) fabric.RateLimiter {
			return b.RateLimiter(redis.RateLimitOptions{Name: o.Name, Points: o.Points, Interval: o.Interval})
		},
		Cluster: func(t *testing.T, node *fabric.Node) fabric.ClusterView {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cl, err := b.Cluster(ctx, node, redis.ClusterOptions{HeartbeatInterval: 200 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cl.Close() })
			return cl
		},
		Leases: b.Leases(),
	}
}

// WipeHistory deletes every history key of the deployment, as an operator
// (or a Redis restarted without persistence) would.
func (d *deployment) WipeHistory(t *testing.T) {
	if n := dropPrefix(t, d.url, d.prefix, ":*:h[msd]:*"); n == 0 {
		t.Fatal("no history key to wipe")
	}
}
