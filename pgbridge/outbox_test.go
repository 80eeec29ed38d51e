package pgbridge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/jackc/pgx/v5"
)

// outboxRows returns how many rows the outbox holds.
func outboxRows(t testing.TB, c *pgx.Conn, table string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n); err != nil {
		t.Fatalf("count outbox: %v", err)
	}
	return n
}

// migrate creates the outbox table (the consumer would too; tests that
// write before a consumer runs need it first).
func migrate(t testing.TB, u string, o pgbridge.Options) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := pgbridge.Migrate(ctx, pgConn(t, u), o); err != nil {
		t.Fatal(err)
	}
}

// Outbox rows of any size (100 KB here, far past NOTIFY's 8,000 bytes)
// are published and deleted; a row trigger turns inserts, updates and
// deletes into created, updated and deleted with the row; a row that can
// never be published (a bad topic or event) is dropped and counted, and
// does not hold the rows after it.
func TestOutboxLargeRowsTriggerAndInvalid(t *testing.T) {
	u := schema(t)
	e := newEnv(t)
	inst := e.instance()
	br := e.bridge(inst, pgbridge.Options{URL: u, Outbox: true})
	col := subscribe(t, inst, "big", "todos", "after")
	fabrictest.WaitFor(t, 20*time.Second, "the outbox consumer", func() bool { return br.Ready() == nil })
	db := pgConn(t, u)

	big := strings.Repeat("0123456789", 10_000) // 100 KB
	run(t, db, "INSERT INTO fabric_outbox (topic, event, data) VALUES ('big', 'blob', jsonb_build_object('s', $1::text))", big)
	got := col.waitFor(t, 10*time.Second, "big", nil)
	if dataField(got, "s") != big {
		t.Fatalf("100 KB row: got %d bytes of data", len(got.Data))
	}

	run(t, db, "CREATE TABLE todos (id serial PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false)")
	sql, err := pgbridge.OutboxTriggerSQL("fabric_outbox", "todos", "")
	if err != nil {
		t.Fatal(err)
	}
	run(t, db, sql)
	run(t, db, "INSERT INTO todos (title) VALUES ('write docs')")
	run(t, db, "UPDATE todos SET done = true")
	run(t, db, "DELETE FROM todos")
	for _, want := range []struct{ event, done string }{{"created", "false"}, {"updated", "true"}, {"deleted", "true"}} {
		e := col.waitFor(t, 10*time.Second, "todos", func(e wsclient.Envelope) bool { return e.Event == want.event })
		if dataField(e, "title") != "write docs" || dataField(e, "done") != want.done {
			t.Fatalf("%s: %s", want.event, e.Data)
		}
	}

	// Invalid rows first, then a good one on the same partition or not.
	run(t, db, `INSERT INTO fabric_outbox (topic, event, data) VALUES
		('', 'e', '1'), ('__rpc', 'e', '1'), ('a"b', 'e', '1'), ('after', '', '1'), ('after', 'ok', '{"n":1}')`)
	col.waitFor(t, 10*time.Second, "after", func(e wsclient.Envelope) bool { return e.Event == "ok" })
	fabrictest.WaitFor(t, 10*time.Second, "an empty outbox", func() bool { return outboxRows(t, db, "fabric_outbox") == 0 })
	if n := metric(t, br, "fabric_pg_outbox_rows_invalid_total", "reason=topic"); n != 3 {
		t.Errorf("invalid topic rows %v, want 3", n)
	}
	if n := metric(t, br, "fabric_pg_outbox_rows_invalid_total", "reason=event"); n != 1 {
		t.Errorf("invalid event rows %v, want 1", n)
	}
	for _, e := range col.snapshot() {
		if e.Topic == "after" && e.Event != "ok" {
			t.Errorf("published %+v", e)
		}
	}
	if n := metric(t, br, "fabric_pg_outbox_rows_published_total"); n != 5 {
		t.Errorf("published %v rows, want 5", n)
	}
}

// Migrate is idempotent and safe to run concurrently; an existing table
// keeps its partition count whatever a later call asks for.
func TestMigrateConcurrentAndKeepsPartitions(t *testing.T) {
	u := schema(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, u)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			errs <- pgbridge.Migrate(ctx, c, pgbridge.Options{OutboxTable: "ob", Partitions: 4})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	migrate(t, u, pgbridge.Options{OutboxTable: "ob", Partitions: 16})
	db := pgConn(t, u)
	var comment string
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := db.QueryRow(ctx, "SELECT col_description('ob'::regclass, 5)").Scan(&comment); err != nil {
		t.Fatal(err)
	}
	if comment != "fabric:partitions=4" {
		t.Fatalf("partition comment %q", comment)
	}
	var maxPart int
	run(t, db, "INSERT INTO ob (topic, event) SELECT 't' || g, 'e' FROM generate_series(1, 200) g")
	if err := db.QueryRow(ctx, "SELECT max(partition) FROM ob").Scan(&maxPart); err != nil {
		t.Fatal(err)
	}
	if maxPart != 3 {
		t.Fatalf("max partition %d with 4 partitions", maxPart)
	}
}

// The outbox under failure: 8 concurrent writers insert 10,000 rows on 16
// persistent topics while two bridging instances consume them; the
// consumers' connections are terminated twice and one instance (a separate
// process) is SIGKILLed. Every row arrives exactly once, each topic's rows
// in the order they were written, and the outbox ends empty.
func TestOutboxExactlyOnceUnderFailures(t *testing.T) {
	u := schema(t)
	e := newEnv(t, "ob-*")
	const (
		writers   = 8
		topics    = 16
		rows      = 10_000
		perWriter = rows / writers
	)
	migrate(t, u, pgbridge.Options{})
	admin := pgConn(t, u)
	child, holder := e.child(u, childOpts{Outbox: true})
	inst := e.instance()
	br := e.bridge(inst, pgbridge.Options{URL: u, Outbox: true, BatchSize: 200})
	names := make([]string, topics)
	for i := range names {
		names[i] = fmt.Sprintf("ob-%d", i)
	}
	col := subscribe(t, inst, names...)
	fabrictest.WaitFor(t, 20*time.Second, "the outbox consumer", func() bool { return br.Ready() == nil })

	// Writer w owns topics 2w and 2w+1 and numbers each topic's rows from 0,
	// in transactions of 1 to 20 rows.
	var written sync.WaitGroup
	var progress [writers]int
	var pmu sync.Mutex
	for w := range writers {
		written.Add(1)
		go func() {
			defer written.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, u)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close(context.Background())
			next := [2]int{}
			for done := 0; done < perWriter; {
				k := min(1+rand.IntN(20), perWriter-done)
				var b pgx.Batch
				for range k {
					j := rand.IntN(2)
					b.Queue("INSERT INTO fabric_outbox (topic, event, data) VALUES ($1, 'row', $2)",
						names[2*w+j], fmt.Sprintf(`{"w":%d,"n":%d}`, w, next[j]))
					next[j]++
				}
				if err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error { return tx.SendBatch(ctx, &b).Close() }); err != nil {
					t.Error(err)
					return
				}
				done += k
				pmu.Lock()
				progress[w] = done
				pmu.Unlock()
			}
		}()
	}
	writtenSoFar := func() int {
		pmu.Lock()
		defer pmu.Unlock()
		s := 0
		for _, p := range progress {
			s += p
		}
		return s
	}
	// Failures while the rows flow.
	for i, at := range []int{1500, 4000} {
		fabrictest.WaitFor(t, 30*time.Second, "rows flowing", func() bool { return col.len() >= at })
		n := terminate(t, admin, br.ApplicationName("outbox")) + terminate(t, admin, "fabric:"+holder+":outbox")
		t.Logf("kill %d: %d consumer connections terminated at %d rows written, %d received", i+1, n, writtenSoFar(), col.len())
	}
	fabrictest.WaitFor(t, 30*time.Second, "rows flowing", func() bool { return col.len() >= 6000 })
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("SIGKILL of the other instance at %d rows written, %d received", writtenSoFar(), col.len())
	written.Wait()
	if t.Failed() {
		return
	}
	fabrictest.WaitFor(t, 40*time.Second, "every row delivered", func() bool { return col.len() >= rows })
	fabrictest.WaitFor(t, 10*time.Second, "an empty outbox", func() bool { return outboxRows(t, admin, "fabric_outbox") == 0 })
	// Anything published twice would have arrived by now: the last batch
	// is committed (the outbox is empty) and a publish is acknowledged
	// before its row is deleted. A marker row behind everything settles it.
	run(t, admin, `INSERT INTO fabric_outbox (topic, event, data) SELECT 'ob-' || g, 'end', 'null' FROM generate_series(0, 15) g`)
	fabrictest.WaitFor(t, 10*time.Second, "the end markers", func() bool {
		n := 0
		for _, e := range col.snapshot() {
			if e.Event == "end" {
				n++
			}
		}
		return n == topics
	})

	seen := map[string]int{}
	dups := 0
	next := map[string]int{}
	for _, e := range col.snapshot() {
		if e.Event == "end" {
			continue
		}
		var d struct{ W, N int }
		if err := json.Unmarshal(e.Data, &d); err != nil {
			t.Fatalf("data %s: %v", e.Data, err)
		}
		key := fmt.Sprintf("%s/%d", e.Topic, d.N)
		if seen[key]++; seen[key] > 1 {
			dups++
			continue
		}
		if d.N != next[e.Topic] {
			t.Fatalf("%s: row %d arrived when %d was due", e.Topic, d.N, next[e.Topic])
		}
		next[e.Topic]++
	}
	if len(seen) != rows {
		t.Fatalf("%d distinct rows delivered, want %d", len(seen), rows)
	}
	switch {
	case dups > 0 && pgbridge.DedupeSupported:
		t.Fatalf("%d rows delivered twice", dups)
	case !pgbridge.DedupeSupported:
		t.Logf("NOT CHECKED: exactly once (fabric.MsgID is not wired, see msgid.go); at least once holds, %d rows twice", dups)
	}
	t.Logf("published by this instance: %v rows in %v batches; lag gauge %v s",
		metric(t, br, "fabric_pg_outbox_rows_published_total"), metric(t, br, "fabric_pg_outbox_batches_total"),
		metric(t, br, "fabric_pg_outbox_lag_seconds"))
}
