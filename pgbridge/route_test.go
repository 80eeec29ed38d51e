package pgbridge_test

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/memory"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/jackc/pgx/v5"
)

func TestDefaultRoute(t *testing.T) {
	cases := []struct {
		payload      string
		topic, event string
		data         string
		err          error
	}{
		{`{"topic":"news","event":"posted","data":{"a":1}}`, "news", "posted", `{"a":1}`, nil},
		{`{"topic":"news","event":"posted"}`, "news", "posted", ``, nil},
		{`{"table":"todos","op":"INSERT","row":{"id":1}}`, "todos", "created", `{"id":1}`, nil},
		{`{"table":"todos","op":"update","row":{"id":1}}`, "todos", "updated", `{"id":1}`, nil},
		{`{"table":"todos","op":"Delete","row":{"id":1}}`, "todos", "deleted", `{"id":1}`, nil},
		{`{"table":"todos","op":"deleted"}`, "todos", "deleted", ``, nil},
		{`{"topic":"t","table":"x","op":"insert"}`, "t", "", ``, nil}, // topic wins
		{`{"table":"todos","op":"truncate"}`, "", "", "", pgbridge.ErrShape},
		{`{"table":"todos"}`, "", "", "", pgbridge.ErrShape},
		{`{"topic":1}`, "", "", "", pgbridge.ErrShape},
		{`[1]`, "", "", "", pgbridge.ErrShape},
		{`null`, "", "", "", pgbridge.ErrShape},
		{`"x"`, "", "", "", pgbridge.ErrShape},
		{`hello`, "", "", "", pgbridge.ErrNotJSON},
		{`{"topic":"a"`, "", "", "", pgbridge.ErrNotJSON},
		{``, "", "", "", pgbridge.ErrNotJSON},
	}
	for _, c := range cases {
		m, err := pgbridge.DefaultRoute("ch", []byte(c.payload))
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("%s: err %v, want %v", c.payload, err, c.err)
			}
			continue
		}
		if err != nil || m.Topic != c.topic || m.Event != c.event || string(m.Data) != c.data {
			t.Errorf("%s: got %+v %s, %v", c.payload, m, m.Data, err)
		}
	}
}

func TestNewValidates(t *testing.T) {
	mem := memory.New(memory.Options{})
	defer mem.Close()
	node := newMemoryNode(t, mem)
	for _, c := range []struct {
		name string
		opts pgbridge.Options
		nil  bool // no lease store
		want string
	}{
		{"no URL", pgbridge.Options{}, false, "URL is required"},
		{"bad URL", pgbridge.Options{URL: "postgres://x:notaport/db"}, false, "URL"},
		{"twice", pgbridge.Options{URL: "postgres://x/db", Notify: []string{"a", "a"}}, false, "twice"},
		{"long channel", pgbridge.Options{URL: "postgres://x/db", Notify: []string{strings.Repeat("c", 64)}}, false, "longer"},
		{"no leases", pgbridge.Options{URL: "postgres://x/db"}, true, "lease store"},
		{"bad table", pgbridge.Options{URL: "postgres://x/db", Outbox: true, OutboxTable: "a.b.c"}, false, "schema.table"},
		{"short ttl", pgbridge.Options{URL: "postgres://x/db", LeaseTTL: 100e6}, false, "under a second"},
	} {
		var err error
		if c.nil {
			_, err = pgbridge.New(node, nil, c.opts)
		} else {
			_, err = pgbridge.New(node, mem.Leases(), c.opts)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want %q", c.name, err, c.want)
		}
	}
	// Outbox only needs no lease store; nothing is started by New.
	b, err := pgbridge.New(node, nil, pgbridge.Options{URL: "postgres://x/db", Outbox: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Ready(); err == nil {
		t.Fatal("ready before Start")
	}
	_ = b.Close()
	if err := b.Start(); !errors.Is(err, pgbridge.ErrClosed) {
		t.Fatalf("Start after Close: %v", err)
	}
}

// newMemoryNode returns a node on the in-memory backend, closed at cleanup.
func newMemoryNode(t testing.TB, mem *memory.Backend) *fabric.Node {
	t.Helper()
	node, err := fabric.NewNode(fabric.Config{Broker: mem.Broker(), History: mem.History(),
		Persistent: fabric.MatchTopics([]string{"p-*"}), Logger: fabrictest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })
	return node
}

// chanReceiver hands a broker subscription's envelopes to a channel.
type chanReceiver chan string

func (c chanReceiver) Receive(env []byte, seq, _ uint64) {
	select {
	case c <- fmt.Sprintf("%d %s", seq, env):
	default:
	}
}

// The bridge on the in-memory backend (one process: its lease store, its
// broker without NATS, its history): both modes work.
func TestMemoryBackend(t *testing.T) {
	u := schema(t)
	mem := memory.New(memory.Options{})
	t.Cleanup(func() { _ = mem.Close() })
	node := newMemoryNode(t, mem)
	before := runtime.NumGoroutine()
	ch := channelName("mem")
	b, err := pgbridge.New(node, mem.Leases(), pgbridge.Options{URL: u, Notify: []string{ch}, Outbox: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	got := make(chanReceiver, 16)
	for _, topic := range []string{"plain", "p-1"} {
		sub, err := mem.Broker().Subscribe(topic, got)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	fabrictest.WaitFor(t, 20*time.Second, "the bridge ready", func() bool { return b.Ready() == nil })
	if h := mem.Leases().Holder("pgbridge:" + dbName(t, u) + ":" + ch); h != node.ID() {
		t.Fatalf("lease holder %q, want the node %q", h, node.ID())
	}
	db := pgConn(t, u)
	waitListening(t, b, ch)
	notify(t, db, ch, `{"topic":"plain","event":"n","data":1}`)
	run(t, db, `INSERT INTO fabric_outbox (topic, event, data) VALUES ('p-1', 'row', '{"a": 1}')`)
	want := map[string]bool{`0 {"topic":"plain","event":"n","data":1}`: true, `1 {"topic":"p-1","event":"row","data":{"a": 1}}`: true}
	for range want {
		select {
		case m := <-got:
			if !want[m] {
				t.Fatalf("got %s", m)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("timed out")
		}
	}
	// Close stops every goroutine the bridge started and gives the lease up.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	fabrictest.WaitFor(t, 10*time.Second, "the bridge's goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
	if h := mem.Leases().Holder("pgbridge:" + dbName(t, u) + ":" + ch); h != "" {
		t.Fatalf("lease still held by %q after Close", h)
	}
}

func dbName(t testing.TB, u string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Database
}
