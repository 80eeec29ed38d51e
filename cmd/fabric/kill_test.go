package main

import (
	"context"
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestPresenceSurvivesKill9: three `fabric serve` processes in a cluster
// with presence (heartbeat 500ms, expiry 2s, KV replicated 3 times). A
// member on one instance, watched from another; the member's instance gets
// SIGKILL (no cleanup at all). The watcher sees the leave within
// expireAfter + one heartbeat (+ the store's 250ms expiry granularity).
// The victim is not the presence stream's leader: losing the leader adds a
// Raft election first (measured separately, see docs/presence.md).
func TestPresenceSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three server processes")
	}
	const prefix = "kill9"
	// Every port is chosen up front and distinct: a clustered server left to
	// pick its own client port could take one meant for another process.
	ports := fabrictest.FreeAddrs(t, 9)
	http, cluster, natsAddrs := ports[0:3], ports[3:6], ports[6:9]
	natsAddr := natsAddrs[0]
	routes := "nats://" + strings.Join(cluster, ",nats://")
	procs := make([]*proc, 3)
	for i := range procs {
		args := []string{"--name", "k9-" + string(rune('a'+i)), "--cluster-listen", cluster[i], "--routes", routes,
			"--subject-prefix", prefix, "--presence", "room:*", "--presence-heartbeat", "500ms",
			"--presence-expire", "2s", "--kv-replicas", "3", "--nats-listen", natsAddrs[i]}
		procs[i] = launchProc(t, http[i], args...) // readiness needs the other members
	}
	for _, p := range procs {
		p.waitReady(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Which instance leads the presence bucket's stream?
	nc, err := nats.Connect("nats://" + natsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	var leader string
	fabrictest.WaitFor(t, 30*time.Second, "the presence stream's leader", func() bool {
		s, err := js.Stream(ctx, "KV_"+prefix+"_presence")
		if err != nil || s.CachedInfo().Cluster == nil {
			return false
		}
		leader = s.CachedInfo().Cluster.Leader
		return leader != ""
	})
	victim := 1
	if leader == "k9-b" {
		victim = 2
	}
	t.Logf("presence stream leader %s; killing k9-%c", leader, 'a'+victim)

	watcher, err := wsclient.Dial(ctx, "ws://"+http[0]+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	if err := watcher.Subscribe(ctx, "__presence:room:1"); err != nil {
		t.Fatal(err)
	}
	member, err := wsclient.Dial(ctx, "ws://"+http[victim]+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer member.Close()
	if err := member.Subscribe(ctx, "room:1"); err != nil {
		t.Fatal(err)
	}
	var key string
	for key == "" {
		e, err := watcher.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var m fabric.PresenceMember
		if e.Event == "join" && json.Unmarshal(e.Data, &m) == nil {
			key = m.Key
		}
	}

	// Where the instances' watchers (ordered consumers) live: one on the
	// victim stalls until the Presence replaces it.
	if s, err := js.Stream(ctx, "KV_"+prefix+"_presence"); err == nil {
		var hosts []string
		for ci := range s.ListConsumers(ctx).Info() {
			if ci.Cluster != nil {
				hosts = append(hosts, ci.Cluster.Leader)
			}
		}
		t.Logf("watcher consumers on %v", hosts)
	}
	killed := time.Now()
	t.Logf("SIGKILL at %s", killed.UTC().Format("15:04:05.000"))
	if err := procs[victim].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for {
		e, err := watcher.Next(ctx)
		if err != nil {
			t.Fatalf("no leave after the kill: %v", err)
		}
		var m fabric.PresenceMember
		if e.Event == "leave" && json.Unmarshal(e.Data, &m) == nil && m.Key == key {
			break
		}
	}
	took := time.Since(killed)
	t.Logf("leave seen %s after SIGKILL", took)
	if limit := 2*time.Second + 500*time.Millisecond + 250*time.Millisecond + 500*time.Millisecond; took > limit {
		t.Errorf("leave after %s, want within expireAfter + one heartbeat (%s with slack)", took, limit)
		t.Logf("watcher's instance log:\n%s", procs[0].out)
	}
}
