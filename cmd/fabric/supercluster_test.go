package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestSupercluster: every deployment mode in one system. Two clusters
// joined by gateways, "east" (two routed instances, e0 also a leafnode
// hub) and "west" (one instance), a leaf node instance attached to e0
// (its own JetStream domain), and an instance with no embedded server on
// an external NATS (west's client port). A message published on any of
// them reaches subscribers on all of them; presence is one across the
// clusters and the external instance (one JetStream); a persistent topic
// has one history (placed in one cluster) that every cluster and the
// external instance publish into and read, with one sequence.
func TestSupercluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts five server processes")
	}
	prefix := fmt.Sprintf("sc%d", time.Now().UnixNano()%1e6)
	p := fabrictest.FreeAddrs(t, 13)
	eHTTP, eCluster, eGW := p[0:2], p[2:4], p[4:6]
	eLeaf, wHTTP, wCluster, wGW, wNATS, lHTTP, xHTTP := p[6], p[7], p[8], p[9], p[10], p[11], p[12]
	bin := serverBinary(t)
	common := []string{"--subject-prefix", prefix, "--replay", "feed:*", "--presence", "room:*",
		"--presence-heartbeat", "1s", "--presence-expire", "3s", "--replay-replicas", "1", "--kv-replicas", "1"}
	gateways := fmt.Sprintf("east=nats://%s,east=nats://%s,west=nats://%s", eGW[0], eGW[1], wGW)
	eastRoutes := fmt.Sprintf("nats://%s,nats://%s", eCluster[0], eCluster[1])
	var procs []*proc
	start := func(addr string, args ...string) *proc {
		pr := launchBin(t, bin, addr, append(append([]string{"--data", t.TempDir()}, common...), args...)...)
		procs = append(procs, pr)
		return pr
	}
	e0 := start(eHTTP[0], "--name", "e0", "--cluster-name", "east", "--cluster-listen", eCluster[0], "--routes", eastRoutes,
		"--gateway-listen", eGW[0], "--gateways", gateways, "--leaf-listen", eLeaf)
	e1 := start(eHTTP[1], "--name", "e1", "--cluster-name", "east", "--cluster-listen", eCluster[1], "--routes", eastRoutes,
		"--gateway-listen", eGW[1], "--gateways", gateways)
	w0 := start(wHTTP, "--name", "w0", "--cluster-name", "west", "--cluster-listen", wCluster, "--routes", "nats://"+wCluster,
		"--gateway-listen", wGW, "--gateways", gateways, "--nats-listen", wNATS)
	for _, pr := range []*proc{e0, e1, w0} {
		waitProcReady(t, pr, 90*time.Second)
	}
	leaf := start(lHTTP, "--name", "leaf", "--leaf-remote", "nats://"+eLeaf)
	ext := start(xHTTP, "--nats-url", "nats://"+wNATS)
	for _, pr := range []*proc{leaf, ext} {
		waitProcReady(t, pr, 90*time.Second)
	}
	if _, body := readyz(e0.addr); body["cluster"] == nil || !strings.HasPrefix(fmt.Sprint(body["cluster"].(map[string]any)["gateways"]), "1 of") {
		t.Errorf("e0 /readyz does not report its gateway: %v", body)
	}
	t.Logf("e0 /readyz: %v", mustReadyz(e0.addr))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	names := []string{"e0", "e1", "w0", "leaf", "ext"}
	all := []*proc{e0, e1, w0, leaf, ext}

	// Pub/sub everywhere: a subscriber on every instance, a publish from
	// every instance.
	subs := make([]*wsclient.Client, len(all))
	for i, pr := range all {
		c, err := wsclient.Dial(ctx, "ws://"+pr.addr+"/ws", wsclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Subscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		subs[i] = c
	}
	// Interest crosses routes, gateways and the leaf connection
	// asynchronously: publish probes until every subscriber has one.
	fabrictest.WaitFor(t, 30*time.Second, "interest everywhere", func() bool {
		publishVia(t, e0.addr, "news", `"probe"`)
		for _, c := range subs {
			cctx, ccancel := context.WithTimeout(ctx, 300*time.Millisecond)
			_, err := c.Next(cctx)
			ccancel()
			if err != nil {
				return false
			}
		}
		return true
	})
	drainEvents(subs)
	for i, pr := range all {
		publishVia(t, pr.addr, "news", fmt.Sprintf(`"from %s"`, names[i]))
	}
	for j, c := range subs {
		got := map[string]bool{}
		for len(got) < len(all) {
			e, err := c.Next(ctx)
			if err != nil {
				t.Fatalf("subscriber on %s: %v (got %v)", names[j], err, got)
			}
			var s string
			if json.Unmarshal(e.Data, &s) == nil && strings.HasPrefix(s, "from ") {
				got[s] = true
			}
		}
	}
	t.Logf("every instance received every instance's publish")

	// Presence across the clusters and the external instance.
	watcher, err := wsclient.Dial(ctx, "ws://"+e1.addr+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	if err := watcher.Subscribe(ctx, "__presence:room:1"); err != nil {
		t.Fatal(err)
	}
	for _, pr := range []*proc{w0, ext, e0} {
		m, err := wsclient.Dial(ctx, "ws://"+pr.addr+"/ws", wsclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if err := m.Subscribe(ctx, "room:1"); err != nil {
			t.Fatal(err)
		}
	}
	joins := map[string]bool{}
	for len(joins) < 3 {
		e, err := watcher.Next(ctx)
		if err != nil {
			t.Fatalf("presence: %v after %d joins", err, len(joins))
		}
		var m fabric.PresenceMember
		if e.Event == "join" && json.Unmarshal(e.Data, &m) == nil {
			joins[m.Key] = true
		}
	}
	t.Logf("a watcher in east saw the members joining in west, on the external instance and in east")

	// One history across the supercluster.
	reader, err := wsclient.Dial(ctx, "ws://"+ext.addr+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if err := reader.Subscribe(ctx, "feed:1"); err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for _, pr := range []*proc{w0, e1, ext} {
		seqs = append(seqs, publishOne(t, "http://"+pr.addr, "feed:1"))
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] <= seqs[i-1] {
			t.Fatalf("seqs %v: one history has one increasing sequence", seqs)
		}
	}
	stored := historyOf(t, "http://"+e0.addr, "feed:1")
	for _, s := range seqs {
		if !slices.Contains(stored, s) {
			t.Fatalf("acknowledged seq %d not in the history %v", s, stored)
		}
	}
	for _, want := range stored {
		e, err := reader.Next(ctx)
		if err != nil || e.Seq != want {
			t.Fatalf("reader on ext got %+v %v, want seq %d", e, err, want)
		}
	}
	// Nothing else: the leaf node's own history streams (its JetStream
	// domain, the same names) neither capture nor republish the hub's.
	nctx, ncancel := context.WithTimeout(ctx, 700*time.Millisecond)
	if e, err := reader.Next(nctx); err == nil {
		t.Errorf("reader on ext got an extra %+v", e)
	}
	ncancel()
	for _, pr := range []*proc{w0, ext} {
		if got := historyOf(t, "http://"+pr.addr, "feed:1"); !slices.Equal(got, stored) {
			t.Errorf("history of feed:1 read on %s: %v, want %v", pr.addr, got, stored)
		}
	}
	t.Logf("feed:1 published from west, east and the external instance: seqs %v, history %v read back everywhere", seqs, stored)
}

// waitProcReady waits for a process's /readyz 200, failing early if it
// exits.
func waitProcReady(t *testing.T, pr *proc, d time.Duration) {
	t.Helper()
	m := &member{name: pr.addr, http: pr.addr, p: pr}
	m.waitReady(t, d)
}

func mustReadyz(addr string) map[string]any {
	_, body := readyz(addr)
	return body
}

// publishVia publishes one message through the instance's API.
func publishVia(t *testing.T, addr, topic, data string) {
	t.Helper()
	body := fmt.Sprintf(`{"topic":%q,"event":"m","data":%s}`, topic, data)
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/api/publish", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("publish via %s: %s", addr, resp.Status)
	}
}

// drainEvents discards what the clients have received so far.
func drainEvents(cs []*wsclient.Client) {
	for _, c := range cs {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			_, err := c.Next(ctx)
			cancel()
			if err != nil {
				break
			}
		}
	}
}
