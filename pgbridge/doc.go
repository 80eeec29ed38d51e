// Package pgbridge republishes PostgreSQL changes onto Fabric topics, on
// pgx/v5, in two modes (docs/pgbridge.md):
//
//   - NOTIFY: a dedicated connection LISTENs on channels (default
//     "table_changes"); each notification becomes a publish. A payload
//     {"topic","event","data"} is published as it is; {"table","op","row"},
//     what NotifyTriggerSQL's row trigger sends, becomes topic = table,
//     event = created/updated/deleted, data = row; Options.Route overrides.
//     Payloads that do not map are counted and logged, never published. In
//     a cluster exactly one instance listens to a channel: the holder of a
//     lease in the fabric.LeaseStore (NATS KV), taken over within about
//     LeaseTTL·4/3 when its holder dies. NOTIFY has no replay: what is sent
//     while nobody listens (a failover, a reconnect) is lost.
//   - Outbox: rows of a table (fabric_outbox: id, topic, event, data jsonb,
//     a partition generated from the topic, created_at; see
//     OutboxMigrationSQL, OutboxTriggerSQL) are published in id order per
//     partition and then deleted, in one transaction holding the
//     partition's advisory lock, by every instance in turn; a statement
//     trigger NOTIFYs the consumers, who also poll. A row published again
//     after a crash carries the same message id ("<db>.<schema>.<table>:<id>"),
//     which the history deduplicates on persistent topics; rows of any size
//     work.
//
// New builds a Bridge from Options (no I/O), Start runs it, Close stops it;
// Ready reports its state for /readyz, and it is a prometheus.Collector of
// its fabric_pg_* metrics.
package pgbridge
