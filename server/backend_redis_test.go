package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// throwawayRedis is a redis-server this test started on a free loopback
// port, keeping nothing on disk.
type throwawayRedis struct {
	t    *testing.T
	port string
	dir  string
	cmd  *exec.Cmd
}

func startThrowawayRedis(t *testing.T) *throwawayRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("no redis-server")
		}
		t.Skip("no redis-server")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	r := &throwawayRedis{t: t, port: port, dir: t.TempDir()}
	r.start()
	t.Cleanup(r.kill)
	return r
}

func (r *throwawayRedis) url() string { return "redis://127.0.0.1:" + r.port }

func (r *throwawayRedis) start() {
	r.t.Helper()
	r.cmd = exec.Command("redis-server", "--port", r.port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", r.dir)
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	cmd := r.cmd
	go func() { _ = cmd.Wait() }()
	fabrictest.WaitFor(r.t, 10*time.Second, "redis-server to listen", func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+r.port, 100*time.Millisecond)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// kill stops the server at once (SIGKILL, by its pid), as a crash would.
func (r *throwawayRedis) kill() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	r.cmd = nil
	fabrictest.WaitFor(r.t, 10*time.Second, "redis-server to stop", func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+r.port, 100*time.Millisecond)
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
}

// TestRedisBackendTwoInstances runs two servers on --backend redis sharing
// one Redis and a prefix: pub/sub, replay and presence across them, then
// Redis killed and restarted mid-stream: publishes fail with 503 meanwhile
// and /readyz says so, and once Redis is back both instances carry
// messages again by themselves.
func TestRedisBackendTwoInstances(t *testing.T) {
	rs := startThrowawayRedis(t)
	prefix := fabrictest.TestPrefix(t)
	opts := func() Options {
		o := testOptions(t)
		o.Backend = BackendRedis
		o.Redis = RedisOptions{URL: rs.url(), Prefix: prefix}
		o.Replay.Topics = []string{"feed:*"}
		o.Topics = []TopicPolicy{{Pattern: "room:*", Presence: true}}
		o.Presence = PresenceOptions{Heartbeat: 200 * time.Millisecond, Expire: time.Second}
		return o
	}
	a, b := startServer(t, opts()), startServer(t, opts())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	publish := func(s *Server, topic, data string) (int, uint64) {
		t.Helper()
		status, body := post(t, "http://"+s.Addr()+"/api/publish", fmt.Sprintf(`{"topic":%q,"event":"m","data":%s}`, topic, data), "")
		var out struct{ Seq uint64 }
		_ = json.Unmarshal([]byte(body), &out)
		return status, out.Seq
	}
	next := func(c *wsclient.Client, topic string) wsclient.Envelope {
		t.Helper()
		for {
			e, err := c.Next(ctx)
			if err != nil {
				t.Fatalf("waiting for %s: %v", topic, err)
			}
			if e.Topic == topic {
				return e
			}
		}
	}

	// Pub/sub: a subscription on a, a publish on b.
	live := dial(t, ctx, a, wsclient.Options{})
	if err := live.Subscribe(ctx, "chat:1"); err != nil {
		t.Fatal(err)
	}
	if status, _ := publish(b, "chat:1", `"hello"`); status != 200 {
		t.Fatalf("publish on b: %d", status)
	}
	if e := next(live, "chat:1"); string(e.Data) != `"hello"` {
		t.Fatalf("got %+v", e)
	}

	// Replay: published on b, resumed on a.
	var seqs []uint64
	for i := range 5 {
		status, seq := publish(b, "feed:1", strconv.Itoa(i))
		if status != 200 || seq == 0 {
			t.Fatalf("persistent publish %d: %d seq %d", i, status, seq)
		}
		seqs = append(seqs, seq)
	}
	rc := dial(t, ctx, a, wsclient.Options{})
	if err := rc.SubscribeSince(ctx, "feed:1", seqs[1]); err != nil {
		t.Fatal(err)
	}
	for _, want := range seqs[2:] {
		if e := next(rc, "feed:1"); e.Seq != want {
			t.Fatalf("replayed seq %d, want %d", e.Seq, want)
		}
	}
	if e := next(rc, "__replay:feed:1"); e.Event != "end" || !strings.Contains(string(e.Data), `"recovered":true`) {
		t.Fatalf("got %+v, want a recovered end", e)
	}

	// Presence: a member on a, an observer on b.
	obs := dial(t, ctx, b, wsclient.Options{})
	if err := obs.Subscribe(ctx, "__presence:room:1"); err != nil {
		t.Fatal(err)
	}
	if e := next(obs, "__presence:room:1"); e.Event != "list" || string(e.Data) != "[]" {
		t.Fatalf("got %+v, want an empty list", e)
	}
	member := dial(t, ctx, a, wsclient.Options{})
	if err := member.Subscribe(ctx, "room:1"); err != nil {
		t.Fatal(err)
	}
	waitPresence := func(event string) {
		t.Helper()
		for {
			e := next(obs, "__presence:room:1")
			if e.Event == event {
				return
			}
			if e.Event != "heartbeat" {
				t.Fatalf("got %+v, want %s", e, event)
			}
		}
	}
	waitPresence("join")
	member.Close()
	waitPresence("leave")

	// A plain subscriber of the persistent topic, for after the restart
	// (rc resumed less than the core's floorTTL ago: it would drop the new
	// incarnation's first sequences as late copies).
	stored := dial(t, ctx, a, wsclient.Options{})
	if err := stored.Subscribe(ctx, "feed:1"); err != nil {
		t.Fatal(err)
	}

	// Redis dies mid-stream.
	rs.kill()
	status, _ := publish(b, "chat:1", `"lost"`)
	if status != 503 {
		t.Fatalf("publish with Redis down: %d, want 503", status)
	}
	fabrictest.WaitFor(t, 10*time.Second, "/readyz to report Redis down", func() bool {
		status, _ := get(t, "http://"+b.Addr()+"/readyz")
		return status == 503
	})
	rs.start()
	// Messages published while a's pub/sub connection is still coming back
	// are lost (at most once): publish until a's subscriber hears one.
	fabrictest.WaitFor(t, 20*time.Second, "a publish on b to reach a's subscriber again", func() bool {
		if status, _ := publish(b, "chat:1", `"back"`); status != 200 {
			return false
		}
		wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		for {
			e, err := live.Next(wctx)
			if err != nil {
				return false
			}
			if e.Topic == "chat:1" && string(e.Data) == `"back"` {
				return true
			}
		}
	})
	// The history restarted empty: a new epoch, from seq 1, delivered to
	// a's subscriber.
	// The first call on each of b's pooled connections may still fail (it
	// finds its old connection closed; nothing was sent): retry, as a
	// client would after a 503.
	var seq uint64
	fabrictest.WaitFor(t, 10*time.Second, "a persistent publish to succeed", func() bool {
		status, seq = publish(b, "feed:1", `"new"`)
		return status != 503
	})
	if status != 200 || seq != 1 {
		t.Fatalf("persistent publish after the restart: %d seq %d, want seq 1 of a new epoch", status, seq)
	}
	if e := next(stored, "feed:1"); e.Seq != 1 || string(e.Data) != `"new"` {
		t.Fatalf("after the restart a's subscriber got %+v", e)
	}
	fabrictest.WaitFor(t, 10*time.Second, "/readyz to report Redis back", func() bool {
		status, _ := get(t, "http://"+a.Addr()+"/readyz")
		return status == 200
	})
}
