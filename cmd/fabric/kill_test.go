package main

import (
	"context"
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	nethttp "net/http"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestPresenceSurvivesKill9: three `fabric serve` processes in a cluster
// with presence (heartbeat 1s, expiry 3s, KV replicated 3 times). A
// member on one instance, watched from another; the member's instance gets
// SIGKILL (no cleanup at all). The watcher sees the leave within
// expireAfter + one heartbeat (+ the store's 250ms expiry granularity).
// The victim leads neither the presence stream nor JetStream's meta layer:
// losing a leader adds a Raft election first (see docs/presence.md).
func TestPresenceSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three server processes")
	}
	const prefix = "kill9"
	// Every port is chosen up front and distinct: a clustered server left to
	// pick its own client port could take one meant for another process.
	ports := fabrictest.FreeAddrs(t, 12)
	http, cluster, natsAddrs, monitors := ports[0:3], ports[3:6], ports[6:9], ports[9:12]
	natsAddr := natsAddrs[0]
	routes := "nats://" + strings.Join(cluster, ",nats://")
	procs := make([]*proc, 3)
	for i := range procs {
		args := []string{"--name", "k9-" + string(rune('a'+i)), "--cluster-listen", cluster[i], "--routes", routes,
			"--subject-prefix", prefix, "--presence", "room:*", "--presence-heartbeat", "1s",
			"--presence-expire", "3s", "--kv-replicas", "3", "--nats-listen", natsAddrs[i], "--nats-monitor", monitors[i]}
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
	// And which one leads JetStream's meta layer (needed to create the
	// watchers' consumers)?
	var jsz struct {
		Meta struct {
			Leader string `json:"leader"`
		} `json:"meta_cluster"`
	}
	fabrictest.WaitFor(t, 30*time.Second, "the meta leader", func() bool {
		resp, err := nethttp.Get("http://" + monitors[0] + "/jsz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(&jsz) == nil && jsz.Meta.Leader != ""
	})
	victim, watcherAt := -1, -1
	for i := range 3 {
		name := "k9-" + string(rune('a'+i))
		if name != leader && name != jsz.Meta.Leader && victim < 0 {
			victim = i
		}
	}
	watcherAt = (victim + 1) % 3
	t.Logf("presence stream leader %s, meta leader %s; killing k9-%c, watching from k9-%c",
		leader, jsz.Meta.Leader, 'a'+victim, 'a'+watcherAt)

	watcher, err := wsclient.Dial(ctx, "ws://"+http[watcherAt]+"/ws", wsclient.Options{})
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
	if limit := 3*time.Second + time.Second + 250*time.Millisecond + 500*time.Millisecond; took > limit {
		t.Errorf("leave after %s, want within expireAfter + one heartbeat (%s with slack)", took, limit)
		t.Logf("watcher's instance log:\n%s", procs[watcherAt].out)
	}
}
