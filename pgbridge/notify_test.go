package pgbridge_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/jackc/pgx/v5/pgconn"
)

// waitListening waits until b listens on ch.
func waitListening(t testing.TB, b *pgbridge.Bridge, ch string) {
	t.Helper()
	fabrictest.WaitFor(t, 20*time.Second, "the bridge listening on "+ch, func() bool {
		return metric(t, b, "fabric_pg_listening", "channel="+ch) == 1
	})
}

// A notification reaches a WebSocket client connected to another instance,
// and a row trigger's inserts, updates and deletes arrive as created,
// updated and deleted with the row.
func TestNotifyReachesClientOnAnotherInstance(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	a, b := e.instance(), e.instance()
	ch := channelName("table_changes")
	br := e.bridge(a, pgbridge.Options{URL: u, Notify: []string{ch}})
	col := subscribe(t, b, "news", "todos")
	waitListening(t, br, ch)
	if err := br.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}

	db := pgConn(t, u)
	notify(t, db, ch, `{"topic":"news","event":"posted","data":{"title":"hello","n":1}}`)
	got := col.waitFor(t, 10*time.Second, "news", nil)
	if got.Event != "posted" || dataField(got, "title") != "hello" {
		t.Fatalf("got %+v", got)
	}

	run(t, db, "CREATE TABLE todos (id serial PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false)")
	sql, err := pgbridge.NotifyTriggerSQL("todos", ch, "")
	if err != nil {
		t.Fatal(err)
	}
	run(t, db, sql)
	run(t, db, "INSERT INTO todos (title) VALUES ('buy milk')")
	run(t, db, "UPDATE todos SET done = true WHERE title = 'buy milk'")
	run(t, db, "DELETE FROM todos WHERE title = 'buy milk'")
	for _, want := range []struct{ event, done string }{{"created", "false"}, {"updated", "true"}, {"deleted", "true"}} {
		e := col.waitFor(t, 10*time.Second, "todos", func(e wsclient.Envelope) bool { return e.Event == want.event })
		if dataField(e, "title") != "buy milk" || dataField(e, "done") != want.done || dataField(e, "id") != "1" {
			t.Fatalf("%s: data %s", want.event, e.Data)
		}
	}
	var events []string
	for _, e := range col.snapshot() {
		if e.Topic == "todos" {
			events = append(events, e.Event)
		}
	}
	if strings.Join(events, ",") != "created,updated,deleted" {
		t.Fatalf("todos events %v", events)
	}
	if n := metric(t, br, "fabric_pg_notifications_published_total", "channel="+ch); n != 4 {
		t.Fatalf("published %v, want 4", n)
	}
}

// Payloads that are not JSON, or JSON of no known shape, or with a topic or
// event that cannot be published, are counted by reason and never
// published; a 7,999-byte payload (the most NOTIFY carries) goes through.
func TestNotifyInvalidPayloadsAndLargest(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	inst := e.instance()
	ch := channelName("invalid")
	br := e.bridge(inst, pgbridge.Options{URL: u, Notify: []string{ch}})
	col := subscribe(t, inst, "ok", "big", "t", "__rpc")
	waitListening(t, br, ch)
	db := pgConn(t, u)

	bad := map[string][]string{
		"not_json": {`not json`, `{"topic": "ok", `, ``},
		"shape":    {`[1,2]`, `42`, `{"foo":1}`, `{"table":"t","op":"truncate","row":{}}`, `{"topic":7}`},
		"topic":    {`{"topic":"","event":"e"}`, `{"topic":"__rpc","event":"e"}`, `{"topic":"a\"b","event":"e"}`},
		"event":    {`{"topic":"ok","data":1}`, `{"topic":"ok","event":"a\u0001"}`},
	}
	for _, payloads := range bad {
		for _, p := range payloads {
			notify(t, db, ch, p)
		}
	}
	// The largest payload NOTIFY takes: 7,999 bytes.
	head, tail := `{"topic":"big","event":"e","data":"`, `"}`
	pad := strings.Repeat("x", pgbridge.MaxNotifyPayload-len(head)-len(tail))
	notify(t, db, ch, head+pad+tail)
	// One byte more is refused by Postgres itself.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := db.Exec(ctx, "SELECT pg_notify($1, $2)", ch, head+pad+"x"+tail)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22023" {
		t.Fatalf("an 8,000-byte NOTIFY: err %v, want 22023 payload string too long", err)
	}
	notify(t, db, ch, `{"topic":"ok","event":"last","data":null}`)

	big := col.waitFor(t, 10*time.Second, "big", nil)
	var s string
	if err := json.Unmarshal(big.Data, &s); err != nil || s != pad {
		t.Fatalf("big payload: %d bytes of data, err %v", len(big.Data), err)
	}
	col.waitFor(t, 10*time.Second, "ok", func(e wsclient.Envelope) bool { return e.Event == "last" })
	// The notifications are handled in order: the counters are final.
	for reason, payloads := range bad {
		if n := metric(t, br, "fabric_pg_notifications_invalid_total", "channel="+ch, "reason="+reason); n != float64(len(payloads)) {
			t.Errorf("invalid{reason=%s} = %v, want %d", reason, n, len(payloads))
		}
	}
	for _, e := range col.snapshot() {
		if !(e.Topic == "big" || e.Topic == "ok" && e.Event == "last") {
			t.Errorf("published %+v", e)
		}
	}
	if n := metric(t, br, "fabric_pg_notifications_published_total", "channel="+ch); n != 2 {
		t.Errorf("published %v, want 2", n)
	}
}

// sender sends {"topic":topic,"event":"n","data":{"n":N,"at":unixnano}} on
// ch every interval until stopped, numbering from start.
type sender struct {
	mu   sync.Mutex
	next int
	sent map[int]time.Time
	stop chan struct{}
	done chan struct{}
}

func startSender(t testing.TB, u, ch, topic string, start int, every time.Duration) *sender {
	db := pgConn(t, u)
	s := &sender{next: start, sent: map[int]time.Time{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tk.C:
			}
			s.mu.Lock()
			n := s.next
			s.next++
			s.mu.Unlock()
			now := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := db.Exec(ctx, "SELECT pg_notify($1, $2)", ch,
				fmt.Sprintf(`{"topic":%q,"event":"n","data":{"n":%d,"at":%d}}`, topic, n, now.UnixNano()))
			cancel()
			if err != nil {
				t.Errorf("pg_notify: %v", err)
				return
			}
			s.mu.Lock()
			s.sent[n] = now
			s.mu.Unlock()
		}
	}()
	t.Cleanup(s.halt)
	return s
}

// halt stops the sender and returns the next number it would have sent.
func (s *sender) halt() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

func (s *sender) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next
}

// numbers returns the n of every envelope on topic, in arrival order.
func numbers(col *collector, topic string) []int {
	var out []int
	for _, e := range col.snapshot() {
		if e.Topic == topic {
			n, _ := strconv.Atoi(dataField(e, "n"))
			out = append(out, n)
		}
	}
	return out
}

// checkIncreasing fails on a duplicate or out-of-order number.
func checkIncreasing(t testing.TB, ns []int) {
	t.Helper()
	for i := 1; i < len(ns); i++ {
		if ns[i] <= ns[i-1] {
			t.Fatalf("number %d after %d (position %d): duplicate or reordered", ns[i], ns[i-1], i)
		}
	}
}

// The listener's connection is terminated mid-stream: the bridge
// reconnects, LISTENs again and goes on; nothing is published twice.
func TestNotifyReconnectsAfterTerminate(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	inst := e.instance()
	ch := channelName("reconnect")
	br := e.bridge(inst, pgbridge.Options{URL: u, Notify: []string{ch}})
	col := subscribe(t, inst, "r")
	waitListening(t, br, ch)
	admin := pgConn(t, u)
	s := startSender(t, u, ch, "r", 0, 5*time.Millisecond)
	for kill := range 2 {
		fabrictest.WaitFor(t, 10*time.Second, "messages flowing", func() bool {
			ns := numbers(col, "r")
			return len(ns) > 0 && ns[len(ns)-1] >= s.count()-20 && len(ns) >= 20*(kill+1)
		})
		if n := terminate(t, admin, br.ApplicationName("notify")); n != 1 {
			t.Fatalf("terminated %d listening backends, want 1", n)
		}
		after := s.count()
		fabrictest.WaitFor(t, 10*time.Second, "messages after the reconnect", func() bool {
			ns := numbers(col, "r")
			return len(ns) > 0 && ns[len(ns)-1] > after+10
		})
	}
	s.halt()
	if r := metric(t, br, "fabric_pg_reconnects_total", "channel="+ch); r != 2 {
		t.Fatalf("reconnects %v, want 2", r)
	}
	ns := numbers(col, "r")
	checkIncreasing(t, ns)
	t.Logf("%d sent, %d received across 2 reconnects", s.count(), len(ns))
}

// Two instances bridge one channel: only the lease holder listens, so each
// notification is published once. The holder, a separate process, is
// SIGKILLed: the other instance takes the channel over within the lease's
// window.
func TestNotifyOneBridgerAndFailover(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	ch := channelName("failover")
	const ttl = 2 * time.Second
	admin := pgConn(t, u)
	child, holder := e.child(u, childOpts{Notify: []string{ch}, LeaseTTL: ttl})
	fabrictest.WaitFor(t, 20*time.Second, "the child listening", func() bool {
		return backends(t, admin, "fabric:"+holder+":notify") == 1
	})
	inst := e.instance()
	br := e.bridge(inst, pgbridge.Options{URL: u, Notify: []string{ch}, LeaseTTL: ttl})
	col := subscribe(t, inst, "f")
	fabrictest.WaitFor(t, 10*time.Second, "the second bridger on standby", func() bool { return br.Ready() == nil })

	db := pgConn(t, u)
	const n = 200
	for i := range n {
		notify(t, db, ch, fmt.Sprintf(`{"topic":"f","event":"n","data":{"n":%d}}`, i))
	}
	fabrictest.WaitFor(t, 20*time.Second, "every notification", func() bool { return len(numbers(col, "f")) >= n })
	notify(t, db, ch, `{"topic":"f","event":"n","data":{"n":999}}`)
	fabrictest.WaitFor(t, 10*time.Second, "the marker", func() bool {
		ns := numbers(col, "f")
		return ns[len(ns)-1] == 999
	})
	ns := numbers(col, "f")
	if len(ns) != n+1 {
		t.Fatalf("received %d messages for %d notifications: some twice", len(ns), n+1)
	}
	checkIncreasing(t, ns)
	if p := metric(t, br, "fabric_pg_notifications_published_total", "channel="+ch); p != 0 {
		t.Fatalf("the standby published %v notifications", p)
	}
	if h := metric(t, br, "fabric_pg_lease_held", "channel="+ch); h != 0 {
		t.Fatal("the standby holds the lease")
	}

	// The holder dies; a sender numbers its notifications from 1000 on.
	s := startSender(t, u, ch, "f", 1000, 20*time.Millisecond)
	fabrictest.WaitFor(t, 10*time.Second, "the sender's first messages via the child", func() bool {
		ns := numbers(col, "f")
		return ns[len(ns)-1] >= 1005
	})
	killed := time.Now()
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	window := ttl + ttl/3 + 2*time.Second // lease expiry + standby's poll + connect and LISTEN (slack for -race on 2 cores)
	var first wsclient.Envelope
	fabrictest.WaitFor(t, window+5*time.Second, "the standby taking over", func() bool {
		var ok bool
		first, _, ok = col.find("f", func(e wsclient.Envelope) bool {
			at, _ := strconv.ParseInt(dataField(e, "at"), 10, 64)
			return at > killed.UnixNano()
		})
		return ok
	})
	at, _ := strconv.ParseInt(dataField(first, "at"), 10, 64)
	gap := time.Unix(0, at).Sub(killed)
	t.Logf("takeover: the first notification published after the kill was sent %v after it (lease ttl %v)", gap.Round(time.Millisecond), ttl)
	if gap > window {
		t.Fatalf("takeover took %v, over the documented %v", gap, window)
	}
	after := s.count()
	fabrictest.WaitFor(t, 10*time.Second, "messages after the takeover", func() bool {
		ns := numbers(col, "f")
		return ns[len(ns)-1] > after+5
	})
	s.halt()
	checkIncreasing(t, numbers(col, "f"))
	if h := metric(t, br, "fabric_pg_lease_held", "channel="+ch); h != 1 {
		t.Fatal("the survivor does not hold the lease")
	}
}

// Close gives the lease up: the standby takes over at its next attempt,
// well before the lease would have expired.
func TestNotifyCloseHandsOver(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	ch := channelName("handover")
	a, b := e.instance(), e.instance()
	const ttl = 3 * time.Second
	ba := e.bridge(a, pgbridge.Options{URL: u, Notify: []string{ch}, LeaseTTL: ttl})
	waitListening(t, ba, ch)
	bb := e.bridge(b, pgbridge.Options{URL: u, Notify: []string{ch}, LeaseTTL: ttl})
	fabrictest.WaitFor(t, 10*time.Second, "b on standby", func() bool { return bb.Ready() == nil })
	start := time.Now()
	if err := ba.Close(); err != nil {
		t.Fatal(err)
	}
	waitListening(t, bb, ch)
	if d := time.Since(start); d > ttl {
		t.Fatalf("handover after Close took %v, not under the lease ttl %v", d, ttl)
	}
}

// A killed bridger (no release) is replaced once its lease expires; the
// process and its NATS connection stay up, as after a wedged bridge.
func TestNotifyKilledBridgerReplaced(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	ch := channelName("killed")
	a, b := e.instance(), e.instance()
	const ttl = 2 * time.Second
	ba := e.bridge(a, pgbridge.Options{URL: u, Notify: []string{ch}, LeaseTTL: ttl})
	waitListening(t, ba, ch)
	bb := e.bridge(b, pgbridge.Options{URL: u, Notify: []string{ch}, LeaseTTL: ttl})
	fabrictest.WaitFor(t, 10*time.Second, "b on standby", func() bool { return bb.Ready() == nil })
	start := time.Now()
	pgbridge.Kill(ba)
	waitListening(t, bb, ch)
	d := time.Since(start)
	t.Logf("killed holder replaced after %v", d.Round(time.Millisecond))
	if d > ttl+ttl/3+2*time.Second {
		t.Fatalf("replacement took %v", d)
	}
}
