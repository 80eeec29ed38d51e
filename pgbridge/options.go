package pgbridge

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Defaults of Options.
const (
	// DefaultChannel is the channel listened to when neither Notify nor
	// Outbox is set (the seed's `createNotifyBridge(pg, { channel:
	// 'table_changes' })`).
	DefaultChannel = "table_changes"
	// DefaultOutboxTable is Options.OutboxTable's default.
	DefaultOutboxTable = "fabric_outbox"
	// DefaultPartitions is how many partitions a new outbox table gets.
	DefaultPartitions = 8
	// DefaultBatchSize is how many outbox rows one partition reads at a time.
	DefaultBatchSize = 1000
	// DefaultPollInterval is how often an idle partition looks for rows
	// whose wake-up notification was missed.
	DefaultPollInterval = 300 * time.Millisecond
	// DefaultLeaseTTL is how long a channel's lease outlives its last
	// refresh: a dead bridger's channel is taken over within about this
	// long plus a third of it.
	DefaultLeaseTTL = 3 * time.Second
	// DefaultKeepAlive is how long a listening connection may stay silent
	// before it is pinged.
	DefaultKeepAlive = 15 * time.Second
	// DefaultMaxDisconnected is how long a lease holder tries to reach
	// Postgres before it gives the lease up for another instance to try.
	DefaultMaxDisconnected = 15 * time.Second
	// DefaultBatchTimeout bounds the publishes of one outbox batch.
	DefaultBatchTimeout = 20 * time.Second
	// DefaultPublishConcurrency is how many topics of one outbox batch are
	// published at the same time (each topic's rows one after another).
	DefaultPublishConcurrency = 64
	// DefaultWorkers is how many outbox batches one instance runs at the
	// same time (the size of its connection pool, plus the wake-up
	// listener's connection).
	DefaultWorkers = 4
	// MaxNotifyPayload is the largest NOTIFY payload Postgres accepts, in
	// bytes (it must be shorter than 8000).
	MaxNotifyPayload = 7999
)

// Backoff of every reconnect: from minBackoff doubling to maxBackoff,
// each wait drawn uniformly from its upper half.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// Options configures a Bridge. URL is required; the rest have usable zero
// values.
type Options struct {
	// URL is the Postgres connection string (postgres://user@host/db?…
	// or "host=… dbname=…"), as pgx parses it.
	URL string
	// Notify are the channels to LISTEN on; each notification becomes a
	// publish (see Route). When neither Notify nor Outbox is set it is
	// [DefaultChannel].
	Notify []string
	// Route maps a notification to the message to publish (default
	// DefaultRoute). Returning an error (ErrSkip to skip silently) counts
	// the notification as invalid and publishes nothing.
	Route func(channel string, payload []byte) (Message, error)
	// Outbox runs the outbox consumer on OutboxTable.
	Outbox bool
	// OutboxTable is the outbox table, optionally schema-qualified
	// ("app.outbox"; default DefaultOutboxTable).
	OutboxTable string
	// OutboxChannel is the channel the outbox's insert trigger notifies to
	// wake the consumers (default: the table's name).
	OutboxChannel string
	// NoMigrate leaves the outbox table alone: by default the consumer
	// creates it (with its index and wake-up trigger) if it is missing.
	NoMigrate bool
	// Partitions is how many partitions a table created by the migration
	// gets (default DefaultPartitions). A table that exists keeps its own
	// count (recorded in the comment of its partition column); one made by
	// hand without that comment is read with this count.
	Partitions int
	// BatchSize is how many rows a partition reads and publishes per
	// transaction (default DefaultBatchSize).
	BatchSize int
	// PollInterval is how often an idle partition is looked at when no
	// wake-up notification arrives (default DefaultPollInterval).
	PollInterval time.Duration
	// Workers is how many outbox batches this instance runs at a time, the
	// size of its connection pool (default DefaultWorkers).
	Workers int
	// PublishConcurrency is how many topics of a batch are published at
	// once (default DefaultPublishConcurrency).
	PublishConcurrency int
	// BatchTimeout bounds the publishes of one batch (default
	// DefaultBatchTimeout); rows left unpublished stay for the next one.
	BatchTimeout time.Duration
	// Persist publishes every bridged message with fabric.Persist(); by
	// default the node's Persistent policy decides per topic.
	Persist bool
	// LeaseTTL is the lease of each notify channel (default
	// DefaultLeaseTTL; NATS rounds it up to whole seconds). It is
	// refreshed every LeaseTTL/3.
	LeaseTTL time.Duration
	// LeasePrefix names the leases: channel C's lease is LeasePrefix+C
	// (default "pgbridge:<database>:"). Instances bridging one database
	// must use the same prefix.
	LeasePrefix string
	// KeepAlive is how long a listening connection may stay silent before
	// it is pinged (default DefaultKeepAlive).
	KeepAlive time.Duration
	// MaxDisconnected is how long a channel's lease holder keeps trying to
	// reach Postgres before it gives the lease up (default
	// DefaultMaxDisconnected).
	MaxDisconnected time.Duration
	// Logger receives the bridge's logs (default: the node's logger).
	Logger *slog.Logger
}

// withDefaults returns o with every zero field set to its default.
func (o Options) withDefaults() Options {
	if len(o.Notify) == 0 && !o.Outbox {
		o.Notify = []string{DefaultChannel}
	}
	if o.Route == nil {
		o.Route = DefaultRoute
	}
	if o.OutboxTable == "" {
		o.OutboxTable = DefaultOutboxTable
	}
	if o.OutboxChannel == "" {
		parts := strings.Split(o.OutboxTable, ".")
		o.OutboxChannel = parts[len(parts)-1]
	}
	setInt(&o.Partitions, DefaultPartitions)
	setInt(&o.BatchSize, DefaultBatchSize)
	setInt(&o.Workers, DefaultWorkers)
	setInt(&o.PublishConcurrency, DefaultPublishConcurrency)
	setDur(&o.PollInterval, DefaultPollInterval)
	setDur(&o.BatchTimeout, DefaultBatchTimeout)
	setDur(&o.LeaseTTL, DefaultLeaseTTL)
	setDur(&o.KeepAlive, DefaultKeepAlive)
	setDur(&o.MaxDisconnected, DefaultMaxDisconnected)
	return o
}

// validate reports the first option that cannot work.
func (o Options) validate() error {
	if o.URL == "" {
		return errors.New("URL is required")
	}
	seen := map[string]bool{}
	for _, ch := range o.Notify {
		if err := validChannel(ch); err != nil {
			return err
		}
		if seen[ch] {
			return fmt.Errorf("channel %q listed twice", ch)
		}
		seen[ch] = true
	}
	if o.Outbox {
		if _, err := parseTable(o.OutboxTable); err != nil {
			return err
		}
		if err := validChannel(o.OutboxChannel); err != nil {
			return fmt.Errorf("outbox channel: %w", err)
		}
		if seen[o.OutboxChannel] {
			return fmt.Errorf("outbox channel %q is also a notify channel", o.OutboxChannel)
		}
		if o.Partitions > maxPartitions {
			return fmt.Errorf("%d partitions, at most %d", o.Partitions, maxPartitions)
		}
	}
	if o.LeaseTTL < time.Second {
		return fmt.Errorf("lease ttl %v is under a second", o.LeaseTTL)
	}
	return nil
}

// maxPartitions bounds Options.Partitions (each is a goroutine and a poll).
const maxPartitions = 1024

// maxIdentifier is Postgres's identifier limit (NAMEDATALEN-1 bytes).
const maxIdentifier = 63

func validChannel(ch string) error {
	switch {
	case ch == "":
		return errors.New("empty channel name")
	case len(ch) > maxIdentifier:
		return fmt.Errorf("channel %q is longer than %d bytes", ch, maxIdentifier)
	case strings.ContainsRune(ch, 0):
		return fmt.Errorf("channel %q holds a NUL byte", ch)
	}
	return nil
}

func setInt(p *int, d int) {
	if *p <= 0 {
		*p = d
	}
}

func setDur(p *time.Duration, d time.Duration) {
	if *p <= 0 {
		*p = d
	}
}
