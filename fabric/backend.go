package fabric

import (
	"context"
	"encoding/json"
	"errors"
	"time"
)

// This file is the backend contract: what a Node needs from the system that
// carries messages between instances and keeps shared state. Every
// interface here stores or carries data only; the protocol built on them
// (resume seams, presence diffing, the wire format) lives in this package,
// so a backend never re-implements it. Implementations: package memory (one
// process) and package jetstream (NATS). Package backendtest is the
// conformance suite every implementation passes; see docs/architecture.md.
//
// Nothing here names a subject, a key layout or a header: those are the
// backend's business.

// Broker carries envelopes between instances.
//
// Guarantees: the messages of one topic reach each Receiver in the order the
// backend accepted them, one call at a time; different topics are
// independent. Delivery is at most once: a backend that must drop (a
// subscriber too far behind) drops and counts by reason, it never blocks a
// publisher on a slow instance.
type Broker interface {
	// Publish sends envelope to every instance subscribed to topic. It may
	// buffer: a nil error means accepted for sending, not delivered. An
	// error means the message was not sent.
	Publish(ctx context.Context, topic string, envelope []byte) error
	// Subscribe feeds topic's messages to r until the subscription is
	// stopped; messages of persistent topics arrive with their seq and prev
	// (see History.Append). It is called at most once per topic per Node
	// at a time; a backend may be shared by several Nodes of one process.
	Subscribe(topic string, r Receiver) (Subscription, error)
	// Close stops every subscription made through this Broker and
	// releases its goroutines (other Brokers of a shared backend go on).
	Close() error
}

// Receiver takes messages from a Broker subscription.
type Receiver interface {
	// Receive handles one envelope; seq is its history sequence, or 0, and
	// prev the sequence of the topic's previous stored message (0: none),
	// or UnknownSeq when the backend cannot tell. The envelope is only
	// valid during the call. Receive must not block and must not publish
	// to its own topic (a backend may deliver under a per-topic lock); it
	// may unsubscribe. Stored messages come in sequence order; one may come
	// again (JetStream republishes what a new stream leader applies): the
	// Node drops a stored message at or behind the last one it delivered
	// unless prev is 0 (the topic's stream starting anew) or unknown, and
	// reads from History the stored messages a prev past the last delivered
	// one says the feed skipped: a backend whose feed can skip must not
	// deliver under a lock its History's reads take (the memory backend
	// delivers under its topic lock, and its feed never skips).
	Receive(envelope []byte, seq, prev uint64)
}

// Subscription is one topic's feed from a Broker.
type Subscription interface {
	// Unsubscribe stops the feed; it is idempotent and does not wait for
	// a Receive in progress.
	Unsubscribe() error
}

// UnknownSeq is the prev a Broker passes when it does not know a message's
// predecessor in the topic's history.
const UnknownSeq = ^uint64(0)

// History keeps the messages of persistent topics so that a client can
// resume where it stopped. It belongs to the same backend as the Broker the
// Node uses: Append both stores and delivers.
//
// Guarantees: sequences increase per topic and are the same on every
// instance (they need not be contiguous, and different topics' sequences
// are unrelated); an acknowledged Append is delivered to every subscriber
// of the topic through the Broker with that seq and the topic's previous
// seq as prev, in seq order; a read never returns a message twice or out of
// order. An epoch names one incarnation of a topic's history: when the
// store is wiped or recreated the epoch changes, and sequences of another
// epoch mean nothing.
type History interface {
	// Append stores envelope as topic's next message, delivers it (see
	// above) and returns its position once the store acknowledged it. An
	// error means it was not stored, or that the backend cannot tell
	// (a timeout). msgID, when not empty, makes the append idempotent per
	// topic within the backend's dedupe window (at least a minute; NATS
	// and memory: 2 minutes): an Append of a msgID the topic already
	// stored returns that message's position and neither stores nor
	// delivers again, so a retry after an error never duplicates.
	Append(ctx context.Context, topic string, envelope []byte, msgID string) (Position, error)
	// Since returns topic's retained messages after seq, oldest first, at
	// most limit of them (limit ≤ 0: every retained one). Complete is false
	// when a message after seq is no longer retained, and never false when
	// nothing after seq was lost. Seq 0 asks for everything retained (a
	// reader that has nothing): such a read is Complete.
	Since(ctx context.Context, topic string, seq uint64, limit int) (Range, error)
	// Last returns topic's last position: the sequence of its last
	// message (a backend may report one that already expired), Seq 0 when
	// it has none.
	Last(ctx context.Context, topic string) (Position, error)
	// Epoch returns the current epoch of topic's history; before the
	// topic's first message it is the epoch that message will get. It is
	// cheap (backends cache it): resumes call it before reading.
	Epoch(ctx context.Context, topic string) (string, error)
}

// Position is a place in one topic's history.
type Position struct {
	// Seq is a message's sequence (0: before the first).
	Seq uint64 `json:"seq"`
	// Epoch is the history incarnation Seq belongs to.
	Epoch string `json:"epoch"`
}

// Stored is one retained message of a persistent topic.
type Stored struct {
	// Seq is the message's sequence.
	Seq uint64
	// Envelope is the message as published, without seq.
	Envelope []byte
}

// Range is a read of one topic's history.
type Range struct {
	// Messages are the retained messages after the requested sequence.
	Messages []Stored
	// Complete is false when some message after the requested sequence is
	// no longer retained (or the sequence is unknown to this epoch): the
	// reader has missed messages and should reload its state.
	Complete bool
	// More is true when the limit cut the read short.
	More bool
	// Epoch is the history's epoch at the time of the read.
	Epoch string
}

// PresenceEntry is one instance's record that a user is on a topic.
type PresenceEntry struct {
	// ID identifies the entry in its store: the same Topic, Key and
	// Instance always give the same ID. Stores set it in what they report.
	ID string
	// Topic is the topic the user is on.
	Topic string
	// Key identifies the user (connections with one key count once).
	Key string
	// Instance is the ID of the Node that holds the entry.
	Instance string
	// Data is the user's public fields (JSON), sent to presence clients.
	Data json.RawMessage
}

// PresenceStore keeps presence entries with expiry, for every instance.
// It knows nothing of joins, leaves or the wire: Presence (presence.go)
// derives those from the entries.
//
// Guarantees: writes of one entry by one caller take effect in call order;
// an entry that is not refreshed expires ttl after its last Put, and its
// expiry reaches every watcher as a removal; every watcher sees the changes
// of one entry in the order they took effect.
type PresenceStore interface {
	// Put stores e, or refreshes it, so that it expires ttl (> 0; a
	// backend may round it up to its resolution) after this call unless
	// refreshed or removed. It does not wait for the store.
	Put(e PresenceEntry, ttl time.Duration) PresenceWrite
	// Remove deletes the entry of topic, user key and instance, if any. It
	// does not wait for the store.
	Remove(topic, key, instance string) PresenceWrite
	// Watch feeds every change of every entry, from every instance, to w,
	// beginning with a Reset to the current entries, and returns once that
	// Reset was made (or ctx ends). stop ends the feed and waits for the
	// call in progress.
	Watch(ctx context.Context, w PresenceWatcher) (stop func(), err error)
}

// PresenceWrite is a presence write on its way to the store.
type PresenceWrite interface {
	// Wait returns once the write is stored and every watcher of the store
	// in this process has been told (nil), or failed (its error), or ctx
	// ends. Stores log failed writes whether or not anyone waits.
	Wait(ctx context.Context) error
}

// PresenceWatcher receives a PresenceStore's changes, one call at a time.
type PresenceWatcher interface {
	// PresenceReset replaces every entry known with entries: the first
	// load, and again whenever the store had to restart its feed (changes
	// in between may have been missed).
	PresenceReset(entries []PresenceEntry)
	// PresencePut reports an entry stored. Refreshes of a known entry may
	// or may not be reported.
	PresencePut(e PresenceEntry)
	// PresenceRemoved reports that the entry with this ID was removed or
	// expired.
	PresenceRemoved(id string)
}

// RateLimiter admits or refuses work per key, with limits shared by every
// instance that uses the same store.
//
// Guarantees: across every instance, at most the configured points are
// admitted per key and interval (a backend documents any slack); a
// decision costs at most one round trip to the store.
type RateLimiter interface {
	// Consume takes cost tokens from key's bucket. remaining is a lower
	// bound of the tokens left in the current interval, resetAfter the time
	// until the bucket refills (or the ban ends). A non-nil err reports a
	// backend failure; allowed is then the limiter's fail-open policy.
	Consume(ctx context.Context, key string, cost int) (allowed bool, remaining int, resetAfter time.Duration, err error)
	// Reset forgets key's consumption and ban everywhere.
	Reset(ctx context.Context, key string) error
	// Ban refuses key everywhere for d.
	Ban(ctx context.Context, key string, d time.Duration) error
	// Unban lifts a ban on key.
	Unban(ctx context.Context, key string) error
}

// ClusterView answers questions about the whole cluster, not one instance,
// and acts on a user's connections wherever they are.
//
// Guarantees: every method covers every instance the view knows of that
// answers in time (before ctx ends, or the backend's own timeout when ctx
// has none). When a known instance does not answer, the method returns what
// the others answered with an error wrapping ErrPartialCluster; an instance
// that answered late may still have acted (Disconnect, Unsubscribe). Any
// other error means nothing was answered. A user is the UserKey of a
// connection's user data (a backend may let the application choose
// another key): anonymous connections are never addressed. Counts are
// snapshots taken on each instance as it answers.
type ClusterView interface {
	// Connections returns the number of connections on every instance.
	Connections(ctx context.Context) (int, error)
	// Subscribers returns the number of subscribers of topic on every instance.
	Subscribers(ctx context.Context, topic string) (int, error)
	// SendToUser delivers {topic, event, data} to every connection of the
	// user, on whichever instance it is.
	SendToUser(ctx context.Context, userID, topic, event string, data any) error
	// Channels returns the topics that have subscribers on some instance,
	// with their subscriber counts summed over every instance, among those
	// matching pattern (MatchTopics syntax, '*' is any run; "" matches
	// every topic). It returns the first of them in byte order, at most
	// limit (≤ 0: DefaultChannelsLimit; capped at MaxChannelsLimit), fewer
	// when the answer would be too large to carry, and truncated reports
	// that more topics matched. Every count returned is complete over the
	// instances that answered.
	Channels(ctx context.Context, pattern string, limit int) (channels map[string]int, truncated bool, err error)
	// Info describes every instance, one InstanceInfo each.
	Info(ctx context.Context) ([]InstanceInfo, error)
	// Disconnect closes every connection of userID, on every instance, with
	// the WebSocket close code and reason (Client.Close), and returns how
	// many it closed. Connections end shortly after: the transport
	// finishes the close.
	Disconnect(ctx context.Context, userID string, code int, reason string) (int, error)
	// Unsubscribe removes every connection of userID, on every instance,
	// from topic (Node.Unsubscribe) and returns how many were subscribed.
	// The clients are not told.
	Unsubscribe(ctx context.Context, userID, topic string) (int, error)
}

// Bounds of ClusterView.Channels.
const (
	// DefaultChannelsLimit is the most topics Channels returns when the
	// caller sets no limit.
	DefaultChannelsLimit = 1000
	// MaxChannelsLimit is the most topics Channels ever returns.
	MaxChannelsLimit = 10000
)

// ErrPartialCluster is wrapped when not every known instance answered a
// ClusterView call in time; the result then covers those that did.
var ErrPartialCluster = errors.New("not every instance answered")

// InstanceInfo describes one instance of the cluster (ClusterView.Info).
type InstanceInfo struct {
	// ID is the instance's Node ID.
	ID string `json:"id"`
	// Name is the instance's configured name ("" when it has none).
	Name string `json:"name,omitempty"`
	// Version is the Fabric version it runs ("" when unknown).
	Version string `json:"version,omitempty"`
	// Connections is its number of connections.
	Connections int `json:"connections"`
	// Subscriptions is its number of (connection, topic) subscriptions.
	Subscriptions int `json:"subscriptions"`
	// Topics is its number of topics with subscribers.
	Topics int `json:"topics"`
	// Uptime is how long it has been running.
	Uptime time.Duration `json:"uptime"`
}

// LeaseStore grants named leases that at most one holder has at a time,
// across every instance (one Postgres listener per channel, say).
//
// Guarantees: while a lease is held and refreshed within its ttl, no other
// holder gets it; a holder that stops refreshing loses it ttl after its
// last successful Acquire (within the backend's TTL resolution: NATS rounds
// up to whole seconds).
type LeaseStore interface {
	// Acquire takes name for holder, or refreshes holder's lease, for ttl.
	// It reports whether holder has the lease now; false with a nil error
	// means someone else holds it.
	Acquire(ctx context.Context, name, holder string, ttl time.Duration) (bool, error)
	// Release gives name up if holder has it.
	Release(ctx context.Context, name, holder string) error
}

// ErrBackendUnavailable is wrapped by backend errors that mean "try again
// later" (the store is unreachable or has no leader), as opposed to a
// refused request.
var ErrBackendUnavailable = errors.New("backend unavailable")
