package pgbridge_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/pgbridge"
)

// The figures of docs/benchmarks.md ("Postgres bridge"). Each iteration is
// one whole run: use -benchtime 1x.
//
//	go test -run '^$' -bench 'BenchmarkNotifyLatency|BenchmarkOutboxThroughput' -benchtime 1x ./pgbridge/

// BenchmarkNotifyLatency sends 1,000 notifications/s for 5 s on one
// instance's bridged channel and measures, on a WebSocket client of another
// instance, the time from just before pg_notify to the message's arrival.
func BenchmarkNotifyLatency(b *testing.B) {
	u := schema(b)
	e := newEnv(b)
	a, other := e.instance(), e.instance()
	ch := channelName("latency")
	br := e.bridge(a, pgbridge.Options{URL: u, Notify: []string{ch}})
	col := subscribe(b, other, "lat")
	waitListening(b, br, ch)
	db := pgConn(b, u)
	const rate, dur = 1000, 5 * time.Second
	for range b.N {
		col.mu.Lock()
		col.got, col.at = nil, nil
		col.mu.Unlock()
		start := time.Now()
		sent := 0
		for time.Since(start) < dur {
			// On a schedule: a slow round trip is caught up, not skipped.
			if d := time.Until(start.Add(time.Duration(sent) * time.Second / rate)); d > 0 {
				time.Sleep(d)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := db.Exec(ctx, "SELECT pg_notify($1, $2)", ch,
				`{"topic":"lat","event":"t","data":{"at":`+strconv.FormatInt(time.Now().UnixNano(), 10)+`}}`)
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			sent++
		}
		elapsed := time.Since(start)
		fabrictest.WaitFor(b, 30*time.Second, "every notification", func() bool { return col.len() >= sent })
		col.mu.Lock()
		lat := make([]time.Duration, len(col.got))
		for i, env := range col.got {
			at, _ := strconv.ParseInt(dataField(env, "at"), 10, 64)
			lat[i] = col.at[i].Sub(time.Unix(0, at))
		}
		col.mu.Unlock()
		slices.Sort(lat)
		q := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
		b.ReportMetric(float64(sent)/elapsed.Seconds(), "notifications/s")
		b.ReportMetric(float64(q(0.50).Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(q(0.99).Microseconds())/1000, "p99-ms")
		b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
	}
}

// BenchmarkOutboxThroughput inserts 100,000 rows on 100 topics in one
// transaction while 1 or 3 instances consume the outbox, and measures from
// the commit until a WebSocket client subscribed to every topic has them
// all: rows/s end to end. "core" topics are plain pub/sub (flushed to
// NATS before their rows are deleted); "persistent" ones are stored in the
// JetStream history (each row acknowledged before its delete).
func BenchmarkOutboxThroughput(b *testing.B) {
	for _, persistent := range []bool{false, true} {
		for _, n := range []int{1, 3} {
			kind := "core"
			if persistent {
				kind = "persistent"
			}
			b.Run(fmt.Sprintf("%s/instances=%d", kind, n), func(b *testing.B) { benchOutbox(b, n, persistent, true) })
		}
	}
	// The consumers alone: no WebSocket client in the process.
	b.Run("persistent-nosub/instances=1", func(b *testing.B) { benchOutbox(b, 1, true, false) })
}

func benchOutbox(b *testing.B, instances int, persistent, subscriber bool) {
	const rows, topics = 100_000, 100
	u := schema(b)
	var e *env
	if persistent {
		e = newEnv(b, "bench-*")
	} else {
		e = newEnv(b)
	}
	migrate(b, u, pgbridge.Options{})
	db := pgConn(b, u)
	client := e.instance()
	names := make([]string, topics)
	for i := range names {
		names[i] = fmt.Sprintf("bench-%d", i)
	}
	col := &collector{}
	if subscriber {
		col = subscribe(b, client, names...)
	}
	var bridges []*pgbridge.Bridge
	for i := range instances {
		inst := client
		if i > 0 {
			inst = e.instance()
		}
		bridges = append(bridges, e.bridge(inst, pgbridge.Options{URL: u, Outbox: true, Workers: benchWorkers}))
	}
	for _, br := range bridges {
		fabrictest.WaitFor(b, 20*time.Second, "the consumers", func() bool { return br.Ready() == nil })
	}
	for i := range b.N {
		col.mu.Lock()
		col.got, col.at = nil, nil
		col.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		_, err := db.Exec(ctx, `INSERT INTO fabric_outbox (topic, event, data)
			SELECT 'bench-' || (g % $2), 'row', jsonb_build_object('n', g, 'title', 'a typical small row', 'done', false)
			FROM generate_series(1, $1::int) g`, rows, topics)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		var drained time.Duration
		fabrictest.WaitFor(b, 120*time.Second, "every row", func() bool {
			deleted := 0.0
			for _, br := range bridges {
				deleted += metric(b, br, "fabric_pg_outbox_rows_deleted_total")
			}
			if drained == 0 && deleted >= float64((i+1)*rows) {
				drained = time.Since(start)
			}
			return col.len() >= rows || !subscriber && drained > 0
		})
		elapsed := time.Since(start)
		fabrictest.WaitFor(b, 10*time.Second, "an empty outbox", func() bool { return outboxRows(b, db, "fabric_outbox") == 0 })
		if drained == 0 {
			drained = time.Since(start)
		}
		if subscriber {
			b.ReportMetric(float64(rows)/elapsed.Seconds(), "rows/s")
		}
		b.ReportMetric(float64(rows)/drained.Seconds(), "drained-rows/s")
	}
}

var benchWorkers = func() int { n, _ := strconv.Atoi(os.Getenv("W")); return n }()
