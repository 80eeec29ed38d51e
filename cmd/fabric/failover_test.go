package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
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

// failoverLoad is the size of TestFailoverKill9: the short version runs in
// `make test`, the long one (the 1,000 clients receiving 1,000
// messages a second) in `make chaos`.
type failoverLoad struct {
	clients, topics, rate int
	before, after         time.Duration // publishing before and after the kill
}

func failoverSize() failoverLoad {
	if chaos() {
		// 1,000 messages/s over 100 persistent topics, 10 subscribers
		// each: 10,000 deliveries/s.
		return failoverLoad{clients: 1000, topics: 100, rate: 1000, before: 10 * time.Second, after: 30 * time.Second}
	}
	return failoverLoad{clients: 100, topics: 10, rate: 200, before: 3 * time.Second, after: 4 * time.Second}
}

// TestFailoverKill9: three routed instances with JetStream replicated three
// times (the default for a cluster of three), clients behind a load
// balancer receiving persistent topics under publish load. The first
// instance, started alone, says "waiting for peers (1 of 3)" on /readyz.
// One instance gets SIGKILL: every client it held reconnects through the
// balancer to a survivor, resumes from its last seq, and ends with exactly
// the stored sequence of its topic (no gap, no duplicate, in order); every
// acknowledged publish is stored; presence drops the dead instance's
// member within expireAfter (+ a heartbeat and slack).
func TestFailoverKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three server processes")
	}
	load := failoverSize()
	prefix := fmt.Sprintf("fo%d", time.Now().UnixNano()%1e6)
	ms := newMembers(t, 3, "--subject-prefix", prefix, "--replay", "feed:*", "--replay-max-per-topic", "100000",
		"--presence", "room:*", "--presence-heartbeat", "1s", "--presence-expire", "3s", "--shutdown-timeout", "5s")

	// The first instance alone says what it waits for.
	ms[0].launch(t)
	fabrictest.WaitFor(t, 30*time.Second, "/readyz waiting for peers (1 of 3)", func() bool {
		status, body := readyz(ms[0].http)
		return status == http.StatusServiceUnavailable && body["status"] == "waiting for peers (1 of 3)"
	})
	if resp, err := http.Get("http://" + ms[0].http + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("/healthz while waiting for peers: %v %v", resp, err)
	}
	for _, m := range ms[1:] {
		m.launch(t)
	}
	start := time.Now()
	for _, m := range ms {
		m.waitReady(t, 90*time.Second)
	}
	t.Logf("cluster ready in %s", time.Since(start).Round(time.Millisecond))

	// Replicas: 3 by default in a cluster of three.
	nc, err := nats.Connect("nats://" + ms[1].nats)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var presenceLeader string
	fabrictest.WaitFor(t, 30*time.Second, "the presence bucket at 3 replicas with a leader", func() bool {
		s, err := js.Stream(ctx, "KV_"+prefix+"_presence")
		if err != nil {
			return false
		}
		info := s.CachedInfo()
		if info.Config.Replicas != 3 || info.Cluster == nil {
			return false
		}
		presenceLeader = info.Cluster.Leader
		return presenceLeader != ""
	})
	if s, err := js.Stream(ctx, prefix+"_history_0"); err != nil || s.CachedInfo().Config.Replicas != 3 {
		t.Fatalf("history stream: %v (want 3 replicas by default)", err)
	}

	// Victim: neither the meta leader nor the presence stream's leader, so
	// that presence's timing is the store's TTL and not an election.
	meta := metaLeader(ms[1].http)
	victim := -1
	for _, m := range ms {
		if m.name != meta && m.name != presenceLeader {
			victim = m.i
			break
		}
	}
	if victim < 0 {
		victim = 2
	}
	t.Logf("meta leader %s, presence leader %s: the victim is %s", meta, presenceLeader, ms[victim].name)

	lb := fabrictest.NewBalancer(t, ms[0].http, ms[1].http, ms[2].http)
	wsURL := "ws://" + lb.Addr() + "/ws"
	topics := make([]string, load.topics)
	for i := range topics {
		topics[i] = fmt.Sprintf("feed:%d", i)
	}
	recv := make([]*receiver, load.clients)
	for i := range recv {
		recv[i] = newReceiver(t, ctx, wsURL, topics[i%len(topics)])
	}
	t.Logf("%d clients connected: %v per instance", len(recv), lb.Connections())

	// Presence: a member on the victim (directly, no reconnect), a watcher
	// on a survivor.
	watcherAt := (victim + 1) % 3
	watcher, err := wsclient.Dial(ctx, "ws://"+ms[watcherAt].http+"/ws", wsclient.Options{Buffer: 1 << 14})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	if err := watcher.Subscribe(ctx, "__presence:room:1"); err != nil {
		t.Fatal(err)
	}
	member, err := wsclient.Dial(ctx, "ws://"+ms[victim].http+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer member.Close()
	if err := member.Subscribe(ctx, "room:1"); err != nil {
		t.Fatal(err)
	}
	memberKey := ""
	for memberKey == "" {
		e, err := watcher.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var m fabric.PresenceMember
		if e.Event == "join" && json.Unmarshal(e.Data, &m) == nil {
			memberKey = m.Key
		}
	}

	// Publishes go through a balancer of their own (the clients' one
	// counts WebSocket connections only).
	pubLB := fabrictest.NewBalancer(t, ms[0].http, ms[1].http, ms[2].http)
	pub := newPublisher([]string{"http://" + pubLB.Addr()}, topics, load.rate)
	pctx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() { defer close(pubDone); pub.run(pctx) }()
	time.Sleep(load.before) // load before the kill (not a wait for a condition)

	killed := time.Now()
	held := lb.Connections()[victim]
	if err := ms[victim].p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	lb.SetDown(victim, true)
	pubLB.SetDown(victim, true)
	t.Logf("SIGKILL %s holding %d clients, after %s of publishing", ms[victim].name, held, load.before)

	// Presence drops the dead instance's member within expireAfter.
	leaveSeen := make(chan time.Duration, 1)
	go func() {
		for {
			e, err := watcher.Next(ctx)
			if err != nil {
				return
			}
			var m fabric.PresenceMember
			if e.Event == "leave" && json.Unmarshal(e.Data, &m) == nil && m.Key == memberKey {
				leaveSeen <- time.Since(killed)
				return
			}
		}
	}()

	fabrictest.WaitFor(t, 60*time.Second, "every client of the dead instance reconnected", func() bool {
		c := lb.Connections()
		return c[victim] == 0 && c[0]+c[1]+c[2]-c[victim] >= len(recv)
	})
	t.Logf("clients reconnected within %s: %v per instance", time.Since(killed).Round(time.Millisecond), lb.Connections())
	select {
	case took := <-leaveSeen:
		t.Logf("presence leave seen %s after SIGKILL", took.Round(time.Millisecond))
		if limit := 3*time.Second + time.Second + 250*time.Millisecond + 1500*time.Millisecond; took > limit {
			t.Errorf("presence leave after %s, want within expireAfter + a heartbeat (%s with slack)", took, limit)
		}
	case <-time.After(30 * time.Second):
		t.Error("no presence leave for the dead instance's member")
	}
	time.Sleep(max(0, load.after-time.Since(killed))) // load after the kill
	stopPub()
	<-pubDone
	t.Logf("publisher: %s", pub.summary())
	// A publish to a partition whose leader died fails while the new
	// leader is elected (a Raft election timeout, 4 to 9s in nats-server;
	// up to about 12s measured on a loaded 2-core machine with every
	// partition electing at once). One sent 20s after the kill failing
	// would be an outage (the long version publishes that long).
	const outage = 20 * time.Second
	late := pub.failuresBetween(killed.Add(outage), time.Now())
	t.Logf("failed publishes: %d sent before the kill, %d within %s of it, %d later", pub.failuresBetween(time.Time{}, killed),
		pub.failuresBetween(killed, killed.Add(outage)), outage, late)

	if late > 0 {
		t.Errorf("%d publishes sent more than %s after the kill failed", late, outage)
		for _, m := range ms {
			if m.i != victim {
				out := m.p.out.String()
				t.Logf("%s's log (last 3000 bytes):\n%s", m.name, out[max(0, len(out)-3000):])
			}
		}
	}
	// The stored sequence of each topic, read from a survivor.
	survivor := "http://" + ms[watcherAt].http
	stored := map[string][]uint64{}
	for _, tp := range topics {
		stored[tp] = historyOf(t, survivor, tp)
	}
	pub.mu.Lock()
	lost := 0
	for tp, acked := range pub.acked {
		in := map[uint64]bool{}
		for _, s := range stored[tp] {
			in[s] = true
		}
		for _, s := range acked {
			if !in[s] {
				lost++
			}
		}
	}
	pub.mu.Unlock()
	if lost > 0 {
		t.Errorf("%d acknowledged publishes are not stored", lost)
	}
	// Every client ends with exactly its topic's stored sequence.
	fabrictest.WaitFor(t, 90*time.Second, "every client caught up", func() bool {
		for _, r := range recv {
			want := stored[r.topic]
			if len(want) > 0 && r.last() != want[len(want)-1] {
				return false
			}
		}
		return true
	})
	bad, reconnected := 0, 0
	for i, r := range recv {
		if r.c.Connections() > 1 {
			reconnected++
		}
		if msg := checkSequence(r.got(), stored[r.topic]); msg != "" {
			if bad++; bad <= 5 {
				t.Errorf("client %d (%s, %d connections): %s", i, r.topic, r.c.Connections(), msg)
				if m := firstMissing(r.got(), stored[r.topic]); m > 0 {
					t.Logf("client %d around %d: %s", i, m, r.around(m))
				}
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d clients did not get their topic's exact sequence", bad, len(recv))
	}
	if reconnected < held {
		t.Errorf("%d clients reconnected, the dead instance held %d", reconnected, held)
	}
	total := 0
	for _, s := range stored {
		total += len(s)
	}
	t.Logf("%d clients (%d reconnected) each got their topic's exact sequence; %d messages stored over %d topics",
		len(recv), reconnected, total, len(topics))
}

// TestRollingRestart: the three instances restarted one at a time (SIGTERM,
// out of the balancer, back once /readyz says it has caught up) while
// publishes go on: no acknowledged publish is lost (each instance's
// history has them all) and subscribers behind the balancer end with the
// exact stored sequences.
func TestRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three server processes")
	}
	rate, clients := 100, 30
	if chaos() {
		rate, clients = 1000, 300
	}
	prefix := fmt.Sprintf("rr%d", time.Now().UnixNano()%1e6)
	ms := newMembers(t, 3, "--subject-prefix", prefix, "--replay", "feed:*", "--replay-max-per-topic", "100000",
		"--shutdown-timeout", "5s")
	for _, m := range ms {
		m.launch(t)
	}
	for _, m := range ms {
		m.waitReady(t, 90*time.Second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	lb := fabrictest.NewBalancer(t, ms[0].http, ms[1].http, ms[2].http)
	topics := []string{"feed:a", "feed:b", "feed:c", "feed:d", "feed:e"}
	recv := make([]*receiver, clients)
	for i := range recv {
		recv[i] = newReceiver(t, ctx, "ws://"+lb.Addr()+"/ws", topics[i%len(topics)])
	}
	pub := newPublisher([]string{"http://" + lb.Addr()}, topics, rate)
	pctx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() { defer close(pubDone); pub.run(pctx) }()

	for _, m := range ms {
		time.Sleep(time.Second) // publishing between restarts (load, not a wait)
		lb.SetDown(m.i, true)   // what a failing readiness probe or a preStop does
		start := time.Now()
		if err := m.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-m.p.done:
			if err != nil {
				t.Fatalf("%s exited with %v\n%s", m.name, err, m.p.out)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s still running 30s after SIGTERM", m.name)
		}
		m.launch(t)
		var states []string
		fabrictest.WaitFor(t, 90*time.Second, m.name+" ready again", func() bool {
			status, body := readyz(m.http)
			if s, _ := body["status"].(string); s != "" && (len(states) == 0 || states[len(states)-1] != s) {
				states = append(states, s)
			}
			return status == http.StatusOK
		})
		lb.SetDown(m.i, false)
		t.Logf("%s down at %s, back at %s", m.name, start.Format("15:04:05.000"), time.Now().Format("15:04:05.000"))
		t.Logf("%s restarted in %s; /readyz went %s", m.name, time.Since(start).Round(time.Millisecond), strings.Join(states, " → "))
	}
	time.Sleep(time.Second)
	stopPub()
	<-pubDone
	t.Logf("publisher: %s", pub.summary())
	pub.mu.Lock()
	defer pub.mu.Unlock()
	stored := map[string][]uint64{}
	for _, m := range ms {
		for _, tp := range topics {
			seqs := historyOf(t, "http://"+m.http, tp)
			in := map[uint64]bool{}
			for _, s := range seqs {
				in[s] = true
			}
			lost := 0
			for _, s := range pub.acked[tp] {
				if !in[s] {
					lost++
				}
			}
			if lost > 0 {
				t.Errorf("%s: %d of %d acknowledged publishes to %s missing", m.name, lost, len(pub.acked[tp]), tp)
			}
			if m.i == 0 {
				stored[tp] = seqs
			}
		}
	}
	fabrictest.WaitFor(t, 60*time.Second, "every client caught up", func() bool {
		for _, r := range recv {
			want := stored[r.topic]
			if len(want) > 0 && r.last() != want[len(want)-1] {
				return false
			}
		}
		return true
	})
	bad, reconnects := 0, 0
	for i, r := range recv {
		reconnects += r.c.Connections() - 1
		if msg := checkSequence(r.got(), stored[r.topic]); msg != "" {
			if bad++; bad <= 5 {
				t.Errorf("client %d (%s): %s", i, r.topic, msg)
				if m := firstMissing(r.got(), stored[r.topic]); m > 0 {
					t.Logf("client %d around %d: %s", i, m, r.around(m))
				}
			}
		}
	}
	t.Logf("%d clients, %d reconnections, %d with a wrong sequence", len(recv), reconnects, bad)
	if bad > 0 {
		for _, m := range ms {
			for _, line := range strings.Split(m.p.out.String(), "\n") {
				if strings.Contains(line, "resume") {
					t.Logf("%s: %s", m.name, line)
				}
			}
		}
	}
}
