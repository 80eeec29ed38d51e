package pgbridge

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
)

// This file is the outbox consumer. The table's rows are spread over
// partitions by a hash of their topic (a generated column), so a topic's
// rows are always in one partition. Per partition, a batch is one
// transaction: take the partition's advisory lock (pg_try_advisory_xact_lock
// on the table's OID and the partition; another instance holding it means
// "already being served"), read up to BatchSize rows in id order, publish
// them (topics in parallel, each topic's rows one after another, each with
// the message id "<db>.<schema>.<table>:<id>"), delete the published rows
// and commit. Every instance runs every partition; the lock lets one batch
// of a partition run at a time across them, so a topic's rows are
// published in id order. A crash before the commit leaves the rows for the
// next batch; on persistent topics their second publish carries the same
// message id and is dropped as a duplicate by the history.

// outbox is a Bridge's outbox consumer.
type outbox struct {
	b     *Bridge
	names outboxNames
	st    *state   // setup
	parts []*state // each partition's last batch
	lags  []atomic.Int64
	wake  []chan struct{}

	pool      *pgxpool.Pool
	lockKey   int32
	msgPrefix string
	lockSQL   string
	selectSQL string
	deleteSQL string
}

func newOutbox(b *Bridge) *outbox {
	n, _ := newOutboxNames(b.opts.OutboxTable, b.opts.OutboxChannel) // validated by New
	return &outbox{b: b, names: n, st: newState()}
}

// outboxRow is one row read from the table.
type outboxRow struct {
	id      int64
	topic   string
	event   string
	data    []byte
	created time.Time
}

// run sets the consumer up (retrying until Postgres answers) and then
// serves every partition until the bridge closes.
func (o *outbox) run() {
	ctx := o.b.ctx
	pool, err := pgxpool.NewWithConfig(ctx, o.b.poolCfg)
	if err != nil {
		o.st.set(err)
		o.b.log.Error("outbox: connection pool", "err", err)
		return
	}
	o.pool = pool
	defer pool.Close()
	var bo backoff
	for {
		err := o.setup(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		o.st.set(err)
		o.b.m.obErrors.WithLabelValues("setup").Inc()
		o.b.log.Warn("outbox: not ready; retrying", "table", o.b.opts.OutboxTable, "err", err)
		if !sleep(ctx, bo.next()) {
			return
		}
	}
	n := len(o.parts)
	o.b.log.Info("outbox consumer started", "table", o.b.opts.OutboxTable, "partitions", n, "channel", o.names.channel)
	o.st.set(nil)
	var wg sync.WaitGroup
	wg.Add(1 + n)
	go func() {
		defer wg.Done()
		o.listen(ctx)
	}()
	for p := range n {
		go func() {
			defer wg.Done()
			o.partition(ctx, p)
		}()
	}
	wg.Wait()
}

// setup migrates the table (unless NoMigrate) and reads its OID and
// partition count.
func (o *outbox) setup(ctx context.Context) error {
	if !o.b.opts.NoMigrate {
		if err := Migrate(ctx, o.pool, o.b.opts); err != nil {
			return err
		}
	}
	info, err := readOutbox(ctx, o.pool, o.names.table, o.b.opts.Partitions)
	if err != nil {
		return err
	}
	var db, schema, rel string
	err = o.pool.QueryRow(ctx, `SELECT current_database(), n.nspname, c.relname
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`, info.oid).Scan(&db, &schema, &rel)
	if err != nil {
		return fmt.Errorf("pgbridge: outbox %s: %w", o.names.table, err)
	}
	o.lockKey = int32(info.oid) // the advisory lock's first key; wraps above 2^31, still unique
	o.msgPrefix = db + "." + schema + "." + rel + ":"
	o.lockSQL = "SELECT pg_try_advisory_xact_lock($1::int4, $2::int4)"
	table := pgx.Identifier{schema, rel}.Sanitize() // as resolved now, whatever search_path says later
	o.selectSQL = "SELECT id, topic, event, data::text, created_at FROM " + table +
		" WHERE partition = $1 ORDER BY id LIMIT $2"
	o.deleteSQL = "DELETE FROM " + table + " WHERE id = ANY($1::bigint[])"
	o.parts = make([]*state, info.partitions)
	o.lags = make([]atomic.Int64, info.partitions)
	o.wake = make([]chan struct{}, info.partitions)
	for p := range o.parts {
		o.parts[p] = &state{}
		o.wake[p] = make(chan struct{}, 1)
	}
	return nil
}

// ready reports the setup's state, then the first failing partition's.
func (o *outbox) ready() error {
	if err := o.st.ready(); err != nil {
		return err
	}
	for p, s := range o.parts {
		if err := s.ready(); err != nil {
			return fmt.Errorf("partition %d: %w", p, err)
		}
	}
	return nil
}

// wakeAll tells every partition to look for rows now.
func (o *outbox) wakeAll() {
	for _, w := range o.wake {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// listen keeps a connection LISTENing on the wake-up channel, reconnecting
// with backoff; every notification, and every (re)connection, wakes every
// partition. Partitions poll anyway, so this only cuts latency.
func (o *outbox) listen(ctx context.Context) {
	ch := o.names.channel
	var bo backoff
	first := true
	for ctx.Err() == nil {
		conn, err := o.b.connect(ctx, "outbox-wake")
		if err == nil {
			if _, err = conn.Exec(ctx, "LISTEN "+pgx.Identifier{ch}.Sanitize()); err != nil {
				o.b.closeConn(conn)
			}
		}
		if err != nil {
			if ctx.Err() == nil {
				o.b.log.Warn("outbox: cannot listen for wake-ups; polling meanwhile", "channel", ch, "err", err)
				sleep(ctx, bo.next())
			}
			continue
		}
		if !first {
			o.b.m.reconnect.WithLabelValues(ch).Inc()
		}
		first = false
		bo.reset()
		o.wakeAll()
		err = o.b.wait(ctx, conn, func(string) bool { o.wakeAll(); return true })
		o.b.closeConn(conn)
		if ctx.Err() == nil {
			o.b.log.Warn("outbox: wake-up connection lost; reconnecting", "channel", ch, "err", err)
			sleep(ctx, bo.next())
		}
	}
}

// partition serves partition p: a batch whenever woken or every
// PollInterval, batches back to back while they come back full, and
// backoff after a failure.
func (o *outbox) partition(ctx context.Context, p int) {
	var bo backoff
	t := time.NewTimer(time.Hour)
	t.Stop()
	defer t.Stop()
	for ctx.Err() == nil {
		n, err := o.batch(ctx, p)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			o.parts[p].set(err)
			o.b.log.Warn("outbox: batch failed; retrying", "partition", p, "err", err)
			sleep(ctx, bo.next())
			continue
		}
		o.parts[p].set(nil)
		bo.reset()
		if n >= o.b.opts.BatchSize {
			continue
		}
		t.Reset(jitter(o.b.opts.PollInterval))
		select {
		case <-ctx.Done():
			return
		case <-o.wake[p]:
			t.Stop() // no stale tick survives Stop (Go 1.23 timers)
		case <-t.C:
		}
	}
}

// batch runs one transaction on partition p and returns how many rows it
// read (0 when another instance holds the partition).
func (o *outbox) batch(ctx context.Context, p int) (n int, err error) {
	conn, err := o.pool.Acquire(ctx)
	if err != nil {
		o.b.m.obErrors.WithLabelValues("postgres").Inc()
		return 0, fmt.Errorf("pgbridge: outbox: connect: %w", err)
	}
	var salvage []int64 // published rows whose delete failed
	defer func() {
		if o.b.killed.Load() {
			cut(conn.Conn().PgConn())
		}
		conn.Release() // first: the salvage may need this pool slot
		o.salvage(ctx, salvage)
	}()
	tx, err := conn.Begin(ctx)
	if err != nil {
		o.b.m.obErrors.WithLabelValues("postgres").Inc()
		return 0, fmt.Errorf("pgbridge: outbox: begin: %w", err)
	}
	committed := false
	defer func() {
		if !committed && !o.b.killed.Load() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = tx.Rollback(rctx)
			cancel()
		}
	}()
	rows, err := o.read(ctx, tx, p)
	if err != nil {
		o.b.m.obErrors.WithLabelValues("postgres").Inc()
		return 0, err
	}
	if len(rows) == 0 {
		o.setLag(p, 0)
		return 0, nil
	}
	o.setLag(p, time.Since(rows[0].created))
	done, perr := o.publish(ctx, rows)
	if o.b.killed.Load() {
		return len(rows), errors.New("killed")
	}
	// Record what was published even when the bridge is closing.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if len(done) > 0 {
		if _, err := tx.Exec(fctx, o.deleteSQL, done); err != nil {
			o.b.m.obErrors.WithLabelValues("postgres").Inc()
			salvage = done
			return len(rows), fmt.Errorf("pgbridge: outbox: delete %d rows: %w", len(done), err)
		}
	}
	if err := tx.Commit(fctx); err != nil {
		o.b.m.obErrors.WithLabelValues("postgres").Inc()
		salvage = done
		return len(rows), fmt.Errorf("pgbridge: outbox: commit: %w", err)
	}
	committed = true
	o.b.m.obDeleted.Add(float64(len(done)))
	o.b.m.obBatches.Inc()
	if perr != nil {
		o.b.m.obErrors.WithLabelValues("publish").Inc()
		return len(rows), perr
	}
	return len(rows), nil
}

// salvage deletes published rows on another connection after the batch's
// own delete or commit failed (its connection lost, typically), so that
// the next batch is less likely to publish them again. It is a best
// effort: rows another instance already read are published again anyway
// (deduplicated on persistent topics), and rows already deleted are not
// touched.
func (o *outbox) salvage(ctx context.Context, done []int64) {
	if len(done) == 0 || o.b.killed.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	tag, err := o.pool.Exec(ctx, o.deleteSQL, done)
	if err != nil {
		o.b.log.Warn("outbox: published rows not deleted; they will be published again", "table", o.b.opts.OutboxTable,
			"rows", len(done), "err", err)
		return
	}
	o.b.m.obDeleted.Add(float64(tag.RowsAffected()))
}

// read takes partition p's lock and reads its first BatchSize rows; none
// when another instance holds the lock. The lock and the read are
// pipelined as two statements: the read's snapshot is taken after the lock
// is held, so it never sees rows the previous holder already deleted.
func (o *outbox) read(ctx context.Context, tx pgx.Tx, p int) ([]outboxRow, error) {
	var bt pgx.Batch
	bt.Queue(o.lockSQL, o.lockKey, int32(p))
	bt.Queue(o.selectSQL, p, o.b.opts.BatchSize)
	br := tx.SendBatch(ctx, &bt)
	defer br.Close()
	var locked bool
	if err := br.QueryRow().Scan(&locked); err != nil {
		return nil, fmt.Errorf("pgbridge: outbox: lock partition %d: %w", p, err)
	}
	rs, err := br.Query()
	if err != nil {
		return nil, fmt.Errorf("pgbridge: outbox: read partition %d: %w", p, err)
	}
	if !locked {
		rs.Close()
		return nil, rs.Err()
	}
	var out []outboxRow
	for rs.Next() {
		var r outboxRow
		if err := rs.Scan(&r.id, &r.topic, &r.event, &r.data, &r.created); err != nil {
			rs.Close()
			return nil, fmt.Errorf("pgbridge: outbox: read partition %d: %w", p, err)
		}
		out = append(out, r)
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("pgbridge: outbox: read partition %d: %w", p, err)
	}
	return out, br.Close()
}

// publish publishes rows, topics in parallel (at most PublishConcurrency at
// a time) and each topic's rows in order, stopping a topic at its first
// failure so that none of its later rows goes out before it. It returns the
// ids to delete (published, or never publishable) and the first error.
func (o *outbox) publish(ctx context.Context, rows []outboxRow) ([]int64, error) {
	ctx, cancel := context.WithTimeout(ctx, o.b.opts.BatchTimeout)
	defer cancel()
	var order []string
	groups := make(map[string][]outboxRow)
	for _, r := range rows {
		if _, ok := groups[r.topic]; !ok {
			order = append(order, r.topic)
		}
		groups[r.topic] = append(groups[r.topic], r)
	}
	var (
		mu       sync.Mutex
		done     = make([]int64, 0, len(rows))
		core     []int64 // published without history: to flush before deleting
		firstErr error
		wg       sync.WaitGroup
		sem      = make(chan struct{}, o.b.opts.PublishConcurrency)
	)
	for _, topic := range order {
		sem <- struct{}{}
		wg.Add(1)
		go func(rs []outboxRow) {
			defer wg.Done()
			defer func() { <-sem }()
			var ok, plain []int64
			var err error
			for _, r := range rs {
				var seq uint64
				seq, err = o.publishRow(ctx, r)
				if errors.Is(err, errInvalidRow) {
					ok, err = append(ok, r.id), nil
					continue
				}
				if err != nil {
					break
				}
				if seq == 0 {
					plain = append(plain, r.id)
				} else {
					ok = append(ok, r.id)
				}
			}
			mu.Lock()
			done = append(done, ok...)
			core = append(core, plain...)
			if err != nil && firstErr == nil {
				firstErr = err
			}
			mu.Unlock()
		}(groups[topic])
	}
	wg.Wait()
	if len(core) > 0 {
		if err := o.flush(ctx); err != nil {
			if firstErr == nil {
				firstErr = err
			}
		} else {
			done = append(done, core...)
		}
	}
	return done, firstErr
}

var errInvalidRow = errors.New("pgbridge: outbox row can never be published")

// publishRow publishes one row and returns its seq (0: not persistent).
func (o *outbox) publishRow(ctx context.Context, r outboxRow) (uint64, error) {
	env, reason, err := trustedEnvelope(r.topic, r.event, r.data)
	if err != nil {
		o.b.m.obInvalid.WithLabelValues(reason).Inc()
		o.b.log.Error("outbox: row dropped: it can never be published", "table", o.b.opts.OutboxTable, "id", r.id,
			"reason", reason, "err", err)
		return 0, errInvalidRow
	}
	opts := append(o.b.publishOptions(), msgID(o.msgPrefix+strconv.FormatInt(r.id, 10)))
	seq, err := o.b.node.PublishEnvelope(ctx, r.topic, env, opts...)
	if err != nil {
		return 0, fmt.Errorf("pgbridge: outbox: publish row %d on %q: %w", r.id, clip(r.topic, 64), err)
	}
	o.b.m.obPublished.Inc()
	return seq, nil
}

// trustedEnvelope is Message.envelope for data that Postgres produced from
// a jsonb value (valid JSON: not checked again).
func trustedEnvelope(topic, event string, data []byte) ([]byte, string, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return nil, reasonTopic, err
	}
	if fabric.IsReserved(topic) {
		return nil, reasonTopic, fmt.Errorf("topic %q is reserved", clip(topic, 64))
	}
	if err := fabric.ValidateEvent(event); err != nil {
		return nil, reasonEvent, err
	}
	return fabric.Envelope(topic, event, data), "", nil
}

// flush waits until the broker has handed the publishes made so far to
// NATS (a core publish is buffered): only then may their rows be deleted.
func (o *outbox) flush(ctx context.Context) error {
	type flusher interface{ Flush(context.Context) error }
	type natsConn interface{ Conn() *nats.Conn }
	switch br := o.b.node.Broker().(type) {
	case flusher:
		return br.Flush(ctx)
	case natsConn:
		if nc := br.Conn(); nc != nil {
			if err := nc.FlushWithContext(ctx); err != nil {
				return fmt.Errorf("pgbridge: outbox: flush NATS: %w", err)
			}
		}
	}
	return nil
}

// setLag records partition p's lag and shows the largest.
func (o *outbox) setLag(p int, d time.Duration) {
	o.lags[p].Store(int64(max(d, 0)))
	var m int64
	for i := range o.lags {
		m = max(m, o.lags[i].Load())
	}
	o.b.m.obLag.Set(time.Duration(m).Seconds())
}
