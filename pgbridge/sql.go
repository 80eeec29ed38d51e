package pgbridge

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Beginner starts transactions: a *pgx.Conn, a *pgxpool.Pool or a pgx.Tx.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// partitionsComment is the comment of an outbox's partition column, which
// records the table's partition count for the consumers.
const partitionsComment = "fabric:partitions="

// parseTable splits a possibly schema-qualified table name.
func parseTable(name string) (pgx.Identifier, error) {
	parts := strings.Split(name, ".")
	if len(parts) > 2 {
		return nil, fmt.Errorf("table %q: at most schema.table", name)
	}
	for _, p := range parts {
		if p == "" || len(p) > maxIdentifier || strings.ContainsRune(p, 0) {
			return nil, fmt.Errorf("table %q: each part must be 1 to %d bytes", name, maxIdentifier)
		}
	}
	return pgx.Identifier(parts), nil
}

// sibling returns the name in t's schema made of t's name and suffix.
func sibling(t pgx.Identifier, suffix string) pgx.Identifier {
	out := append(pgx.Identifier(nil), t...)
	out[len(out)-1] += suffix
	return out
}

// clipIdentifier cuts s to the identifier limit on a character boundary,
// as Postgres does to a longer name.
func clipIdentifier(s string) string {
	if len(s) <= maxIdentifier {
		return s
	}
	n := maxIdentifier
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// quoteLiteral returns s as an SQL string literal.
func quoteLiteral(s string) string {
	q := "'" + strings.ReplaceAll(s, "'", "''") + "'"
	if strings.Contains(s, `\`) {
		return "E" + strings.ReplaceAll(q, `\`, `\\`)
	}
	return q
}

// outboxNames are the SQL names around one outbox table.
type outboxNames struct {
	table    string // sanitized, possibly qualified
	index    string // unqualified: an index lives in its table's schema
	wakeFn   string // the wake-up trigger function, in the table's schema
	wakeTrig string // the wake-up trigger, unqualified
	trigName string // its name, unquoted
	channel  string
}

func newOutboxNames(table, channel string) (outboxNames, error) {
	t, err := parseTable(table)
	if err != nil {
		return outboxNames{}, err
	}
	last := t[len(t)-1]
	return outboxNames{
		table:    t.Sanitize(),
		index:    pgx.Identifier{last + "_partition_id_idx"}.Sanitize(),
		wakeFn:   sibling(t, "_wakeup").Sanitize(),
		wakeTrig: pgx.Identifier{last + "_wakeup"}.Sanitize(),
		trigName: clipIdentifier(last + "_wakeup"),
		channel:  channel,
	}, nil
}

// createSQL creates the table, its index and the partition count's comment.
func (n outboxNames) createSQL(partitions int) string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %[1]s (
	id         bigserial PRIMARY KEY,
	topic      text NOT NULL,
	event      text NOT NULL,
	data       jsonb NOT NULL DEFAULT 'null',
	partition  integer NOT NULL GENERATED ALWAYS AS (mod(hashtext(topic) & 2147483647, %[3]d)) STORED,
	created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS %[2]s ON %[1]s (partition, id);
COMMENT ON COLUMN %[1]s.partition IS '%[4]s%[3]d';
`, n.table, n.index, partitions, partitionsComment)
}

// wakeFnSQL (re)creates the wake-up trigger's function.
func (n outboxNames) wakeFnSQL() string {
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql AS $fabric$
BEGIN
	PERFORM pg_notify(%[2]s, '');
	RETURN NULL;
END
$fabric$;
`, n.wakeFn, quoteLiteral(n.channel))
}

// wakeTrigSQL creates the wake-up trigger: one notification per inserting
// statement (Postgres folds a transaction's identical notifications into one).
func (n outboxNames) wakeTrigSQL() string {
	return fmt.Sprintf(`CREATE TRIGGER %[1]s AFTER INSERT ON %[2]s FOR EACH STATEMENT EXECUTE FUNCTION %[3]s();
`, n.wakeTrig, n.table, n.wakeFn)
}

// OutboxMigrationSQL returns the SQL that creates the outbox of o
// (OutboxTable, OutboxChannel and Partitions, defaults applied): the table,
// its (partition, id) index, the comment recording the partition count, and
// the statement trigger that notifies OutboxChannel on every insert. It is
// what Migrate runs on a database without the table, for migration tools.
func OutboxMigrationSQL(o Options) (string, error) {
	o.URL = "-" // not needed here
	o.Outbox = true
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return "", fmt.Errorf("pgbridge: %w", err)
	}
	n, err := newOutboxNames(o.OutboxTable, o.OutboxChannel)
	if err != nil {
		return "", fmt.Errorf("pgbridge: %w", err)
	}
	return n.createSQL(o.Partitions) + n.wakeFnSQL() +
		fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s;\n", n.wakeTrig, n.table) + n.wakeTrigSQL(), nil
}

// Migrate creates o's outbox table (see OutboxMigrationSQL) if it does not
// exist, and on an existing table (re)creates the wake-up function and adds
// the wake-up trigger if it is missing; it never changes the columns or the
// partition count of an existing table. Concurrent calls from several
// instances are serialised by an advisory lock.
func Migrate(ctx context.Context, db Beginner, o Options) error {
	o.URL = "-"
	o.Outbox = true
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return fmt.Errorf("pgbridge: migrate: %w", err)
	}
	n, err := newOutboxNames(o.OutboxTable, o.OutboxChannel)
	if err != nil {
		return fmt.Errorf("pgbridge: migrate: %w", err)
	}
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('fabric.pgbridge.migrate'))"); err != nil {
			return fmt.Errorf("pgbridge: migrate %s: lock: %w", n.table, err)
		}
		exists, err := tableExists(ctx, tx, n.table)
		if err != nil {
			return fmt.Errorf("pgbridge: migrate %s: %w", n.table, err)
		}
		if !exists {
			if _, err := tx.Exec(ctx, n.createSQL(o.Partitions)); err != nil {
				return fmt.Errorf("pgbridge: migrate: create %s: %w", n.table, err)
			}
		}
		if _, err := tx.Exec(ctx, n.wakeFnSQL()); err != nil {
			return fmt.Errorf("pgbridge: migrate %s: wake-up function: %w", n.table, err)
		}
		var hasTrigger bool
		err = tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2)",
			n.table, n.trigName).Scan(&hasTrigger)
		if err != nil {
			return fmt.Errorf("pgbridge: migrate %s: %w", n.table, err)
		}
		if !hasTrigger {
			if _, err := tx.Exec(ctx, n.wakeTrigSQL()); err != nil {
				return fmt.Errorf("pgbridge: migrate %s: wake-up trigger: %w", n.table, err)
			}
		}
		return nil
	})
}

// tableExists reports whether table resolves (search_path applies), in a
// savepoint: to_regclass takes text only from PostgreSQL 14 on.
func tableExists(ctx context.Context, tx pgx.Tx, table string) (bool, error) {
	sp, err := tx.Begin(ctx)
	if err != nil {
		return false, err
	}
	if _, err = sp.Exec(ctx, "SELECT $1::text::regclass", table); err == nil {
		return true, sp.Commit(ctx)
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return false, sp.Rollback(ctx)
	}
	return false, err
}

// outboxInfo is what a consumer reads about its table: its OID (the
// advisory locks' first key) and partition count.
type outboxInfo struct {
	oid        uint32
	partitions int
}

// readOutbox reads the table's OID and partition count (fallback when
// its partition column carries no count).
func readOutbox(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, table string, fallback int) (outboxInfo, error) {
	var info outboxInfo
	var comment *string
	err := q.QueryRow(ctx, `SELECT c.oid, col_description(c.oid, a.attnum)
		FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'partition' AND NOT a.attisdropped
		WHERE c.oid = $1::regclass`, table).Scan(&info.oid, &comment)
	if errors.Is(err, pgx.ErrNoRows) {
		return info, fmt.Errorf("pgbridge: outbox %s has no partition column", table)
	}
	if err != nil {
		return info, fmt.Errorf("pgbridge: outbox %s: %w", table, err)
	}
	info.partitions = fallback
	if comment != nil && strings.HasPrefix(*comment, partitionsComment) {
		p, err := strconv.Atoi(strings.TrimPrefix(*comment, partitionsComment))
		if err != nil || p <= 0 || p > maxPartitions {
			return info, fmt.Errorf("pgbridge: outbox %s: bad partition count in comment %q", table, *comment)
		}
		info.partitions = p
	}
	return info, nil
}

// OutboxTriggerSQL returns the SQL of a row trigger on table that writes
// every insert, update and delete into the outbox as topic's "created",
// "updated" or "deleted" event with the row (to_jsonb of NEW, or OLD for a
// delete) as data, in the writing transaction: the change and its message
// commit together or not at all. topic "" is the table's name. The trigger
// function ("<outbox>_row", in the outbox's schema) is shared by every
// table; the trigger is "<table>_fabric_outbox".
func OutboxTriggerSQL(outboxTable, table, topic string) (string, error) {
	ob, err := parseTable(outboxTable)
	if err != nil {
		return "", fmt.Errorf("pgbridge: outbox: %w", err)
	}
	t, err := parseTable(table)
	if err != nil {
		return "", fmt.Errorf("pgbridge: %w", err)
	}
	if topic == "" {
		topic = t[len(t)-1]
	}
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql AS $fabric$
BEGIN
	IF TG_OP = 'DELETE' THEN
		INSERT INTO %[2]s (topic, event, data) VALUES (TG_ARGV[0], 'deleted', to_jsonb(OLD));
	ELSE
		INSERT INTO %[2]s (topic, event, data)
		VALUES (TG_ARGV[0], CASE TG_OP WHEN 'INSERT' THEN 'created' ELSE 'updated' END, to_jsonb(NEW));
	END IF;
	RETURN NULL;
END
$fabric$;
DROP TRIGGER IF EXISTS %[3]s ON %[4]s;
CREATE TRIGGER %[3]s AFTER INSERT OR UPDATE OR DELETE ON %[4]s
	FOR EACH ROW EXECUTE FUNCTION %[1]s(%[5]s);
`, sibling(ob, "_row").Sanitize(), ob.Sanitize(), pgx.Identifier{t[len(t)-1] + "_fabric_outbox"}.Sanitize(),
		t.Sanitize(), quoteLiteral(topic)), nil
}

// NotifyTriggerSQL returns the SQL of a row trigger on table that sends
// every insert, update and delete to channel as {"table":topic,
// "op":"insert"|"update"|"delete","row":…} (what DefaultRoute turns into
// topic's created/updated/deleted event). topic "" is the table's name.
// NOTIFY carries at most MaxNotifyPayload bytes: for a larger row the
// trigger sends only {"id":…,"_truncated":true} as the row, so the
// writing transaction never fails; use the outbox for rows that size.
// The function ("fabric_notify_row", in the table's schema) is shared by
// every table; the trigger is "<table>_fabric_notify".
func NotifyTriggerSQL(table, channel, topic string) (string, error) {
	t, err := parseTable(table)
	if err != nil {
		return "", fmt.Errorf("pgbridge: %w", err)
	}
	if err := validChannel(channel); err != nil {
		return "", fmt.Errorf("pgbridge: %w", err)
	}
	if topic == "" {
		topic = t[len(t)-1]
	}
	fn := append(pgx.Identifier(nil), t[:len(t)-1]...)
	fn = append(fn, "fabric_notify_row")
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql AS $fabric$
DECLARE
	r jsonb;
	payload text;
BEGIN
	IF TG_OP = 'DELETE' THEN r := to_jsonb(OLD); ELSE r := to_jsonb(NEW); END IF;
	payload := jsonb_build_object('table', TG_ARGV[1], 'op', lower(TG_OP), 'row', r)::text;
	IF octet_length(payload) > %[6]d THEN
		payload := jsonb_build_object('table', TG_ARGV[1], 'op', lower(TG_OP),
			'row', jsonb_build_object('id', r->'id', '_truncated', true))::text;
	END IF;
	PERFORM pg_notify(TG_ARGV[0], payload);
	RETURN NULL;
END
$fabric$;
DROP TRIGGER IF EXISTS %[2]s ON %[3]s;
CREATE TRIGGER %[2]s AFTER INSERT OR UPDATE OR DELETE ON %[3]s
	FOR EACH ROW EXECUTE FUNCTION %[1]s(%[4]s, %[5]s);
`, fn.Sanitize(), pgx.Identifier{t[len(t)-1] + "_fabric_notify"}.Sanitize(), t.Sanitize(),
		quoteLiteral(channel), quoteLiteral(topic), MaxNotifyPayload), nil
}
