package server

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
)

// TestClusterSize: the size counted from the routes, the instance's own
// route left out however it is named.
func TestClusterSize(t *testing.T) {
	host, _ := os.Hostname()
	for _, tc := range []struct {
		routes []string
		listen string
		want   int
	}{
		{nil, "", 1},
		{[]string{"nats://a:6222", "nats://b:6222", "nats://c:6222"}, "", 4},
		{[]string{"nats://127.0.0.1:7001", "nats://127.0.0.1:7002", "nats://127.0.0.1:7003"}, "127.0.0.1:7001", 3},
		{[]string{"nats://127.0.0.1:7002", "nats://127.0.0.1:7003"}, "127.0.0.1:7001", 3},
		{[]string{"nats://b:6222", "nats://b:6222", " nats://B:6222 "}, "0.0.0.0:6222", 2},
		{[]string{"nats://localhost:6222", "nats://10.255.0.9:6222"}, "0.0.0.0:6222", 2},
		{[]string{"nats://" + host + ".fabric-cluster:6222", "nats://other.fabric-cluster:6222"}, "0.0.0.0:6222", 2},
		{[]string{"nats://" + host + ".fabric-cluster:7777", "nats://other.fabric-cluster:6222"}, "0.0.0.0:6222", 3},
		{[]string{"not a url", "nats://x:1"}, "", 2},
	} {
		if got := ClusterSize(tc.routes, tc.listen); got != tc.want {
			t.Errorf("ClusterSize(%q, %q) = %d, want %d", tc.routes, tc.listen, got, tc.want)
		}
	}
	o := Options{Embed: EmbedOptions{ClusterListen: "127.0.0.1:7001",
		Routes: []string{"nats://127.0.0.1:7001", "nats://127.0.0.1:7002", "nats://127.0.0.1:7003", "nats://127.0.0.1:7004"}}}
	if o.HistoryReplicas() != 3 || o.KVReplicas() != 3 {
		t.Errorf("four members: %d history and %d KV replicas, want 3", o.HistoryReplicas(), o.KVReplicas())
	}
	o.Embed.Routes = o.Embed.Routes[:2]
	o.Replay.Replicas = 1
	if o.HistoryReplicas() != 1 || o.KVReplicas() != 2 {
		t.Errorf("two members, --replay-replicas 1: %d history and %d KV replicas, want 1 and 2", o.HistoryReplicas(), o.KVReplicas())
	}
}

// TestReadyzWaitsForPeers: the first instance of a cluster of three, alone,
// answers /healthz 200 and /readyz 503 "waiting for peers (1 of 3)" while
// New waits for JetStream (its presence bucket), and everything else 503.
func TestReadyzWaitsForPeers(t *testing.T) {
	addrs := fabrictest.FreeAddrs(t, 3)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := testOptions(t)
	o.HTTP.Listener = ln
	o.Embed.ClusterListen = addrs[0]
	o.Embed.Routes = []string{"nats://" + addrs[0], "nats://" + addrs[1], "nats://" + addrs[2]}
	o.Topics = []TopicPolicy{{Pattern: "room:*", Presence: true}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		s, err := New(ctx, o)
		if err == nil {
			s.Close()
		}
		done <- err
	}()
	base := "http://" + ln.Addr().String()
	var body string
	fabrictest.WaitFor(t, 30*time.Second, "/readyz waiting for peers", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		body = string(b)
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(body, `"status":"waiting for peers (1 of 3)"`)
	})
	t.Logf("/readyz: %s", strings.TrimSpace(body))
	if status, b := get(t, base+"/healthz"); status != http.StatusOK || !strings.Contains(b, `"starting"`) {
		t.Errorf("/healthz while starting: %d %s", status, b)
	}
	// Anything else waits for Run; the start ending first answers 503.
	wsDone := make(chan string, 1)
	go func() {
		resp, err := http.Get(base + "/api/info")
		if err != nil {
			wsDone <- err.Error()
			return
		}
		resp.Body.Close()
		wsDone <- resp.Status // 200 would be wrong: the server never ran
	}()
	select {
	case got := <-wsDone:
		t.Fatalf("a request answered while the server starts: %s", got)
	case <-time.After(300 * time.Millisecond): // it waits (what is checked is that nothing comes)
	}
	cancel()
	select {
	case got := <-wsDone:
		if strings.Contains(got, "200") {
			t.Errorf("the waiting request, once the start failed: %s, want it refused or cut", got)
		}
	case <-time.After(30 * time.Second):
		t.Error("the waiting request still waits after the start failed")
	}
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) && (err == nil || !strings.Contains(err.Error(), "context canceled")) {
			t.Errorf("New after its context ended: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("New still running 30s after its context ended")
	}
}
