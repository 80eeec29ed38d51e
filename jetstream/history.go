package jetstream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of HistoryOptions.
const (
	// DefaultMaxPerTopic is how many messages each persistent topic keeps
	// (the seed's maxPerTopic).
	DefaultMaxPerTopic = 200
	// DefaultDuplicateWindow is how long a publish retry is recognised.
	DefaultDuplicateWindow = 2 * time.Minute
	// DefaultAckTimeout bounds one attempt to store a message.
	DefaultAckTimeout = 5 * time.Second
	// DefaultPartitions is how many streams the history is spread over.
	DefaultPartitions = 16
	// MaxPartitions is the most partitions a History accepts.
	MaxPartitions = 1024
)

// HistoryOptions configures NewHistory. The zero value keeps 200 messages
// per topic, forever, in 16 streams created on first use.
type HistoryOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric").
	Prefix string
	// Eager creates every partition's stream in NewHistory, in parallel,
	// so that a configuration the server refuses (replicas it cannot
	// place, no JetStream) fails there; otherwise a partition's stream is
	// created on its first use. A JetStream that is not ready yet (a
	// cluster still forming) is retried lazily either way.
	Eager bool
	// MaxPerTopic is how many messages each topic keeps (default 200).
	MaxPerTopic int
	// MaxAge drops messages older than this (default: none; the per-topic
	// limit alone bounds a live topic, MaxAge also clears dead ones).
	MaxAge time.Duration
	// MaxBytes bounds the whole history (default: unlimited). Each
	// partition's stream gets MaxBytes/Partitions, so a partition whose
	// topics hold more than their share drops its oldest messages before
	// the total reaches MaxBytes.
	MaxBytes int64
	// Replicas is each stream's replication factor on clustered JetStream
	// (default 1).
	Replicas int
	// Partitions is how many streams the topics are spread over (default
	// 16, at most MaxPartitions): topic T lives in partition
	// fnv-1a-32(T's bytes) mod Partitions. A resume reads its topic with a filtered scan of its
	// partition's stream, whose cost grows with the messages of other
	// topics stored between the topic's own, so more partitions make a
	// resume of a busy history cheaper (about Partitions times less to
	// walk). Each partition is one more stream, though: on replicated
	// JetStream one more Raft group (memory, heartbeats, elections), and
	// MaxBytes is split between them. Every instance sharing the history
	// must use the same count: a different one puts topics in other
	// streams. Changing it moves topics to other partitions, which is a new
	// epoch for them; their old messages stay behind in the old streams,
	// and streams of partitions no longer used are left for the operator to
	// delete.
	Partitions int
	// Stream is the streams' base name (default "<prefix>_history");
	// partition i is the stream "<Stream>_<i>".
	Stream string
	// DuplicateWindow is how long a retried publish is recognised as one
	// (default 2m).
	DuplicateWindow time.Duration
	// AckTimeout bounds each attempt to store a message (default 5s); a
	// timed-out attempt is retried with the same message id until the
	// publish's context ends, so a retry never stores a duplicate.
	AckTimeout time.Duration
	// PageMaxBytes bounds the messages one direct get batch of a history
	// read returns (default DefaultPageMaxBytes, 1 MiB); a read goes on
	// with further batches, so this bounds memory, not what a read returns.
	PageMaxBytes int
	// MaxInFlight bounds the Appends waiting for their acks at once
	// (default DefaultMaxInFlight, 4096): Appends are pipelined on the
	// connection (see Append), and beyond this many they wait for a slot,
	// within their context, instead of queueing more work on JetStream.
	MaxInFlight int
}

// History is fabric.History on JetStream streams: the topics are spread
// over Partitions streams by a hash of the topic, one subject per topic
// ("<prefix>.h.<partition>.<token>") with a per-subject limit, so each
// topic keeps its own last N. Each stream republishes every stored message
// onto the topic's live subject with its sequence, which is how
// subscribers on every instance get it; resumes read with batched direct
// gets, no consumers, their answers all arriving on one inbox
// subscription. A topic's sequences and epoch are its partition stream's.
//
// Append deduplicates: a retried attempt carries the same Nats-Msg-Id and
// is stored once within DuplicateWindow. Appends are pipelined: each waits
// for its own ack only, while the others go out behind it on the same
// connection (see Append).
type History struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	opts   HistoryOptions
	api    string // "$JS.API." (or the domain's)
	parts  []*partition
	reads  *replyMux
	pipe   *appendPipe
	idBase string
	nextID atomic.Uint64
}

// partition is one of the history's streams.
type partition struct {
	index     int
	name      string // the stream
	subjects  string // "<prefix>.h.<index>.": the topics' subjects start so
	directGet string // "$JS.API.DIRECT.GET.<stream>"
	lock      chan struct{}
	ensured   atomic.Bool
	refresh   atomic.Bool // an epoch refresh is in flight

	mu        sync.Mutex
	epoch     string
	epochAt   time.Time // when epoch was read
	ensuredAt time.Time // when the stream was last created or updated
}

// NewHistory returns a History on js's connection; with Eager it creates or
// updates every partition's stream first. Close releases it.
func NewHistory(ctx context.Context, js jetstream.JetStream, opts HistoryOptions) (*History, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.MaxPerTopic <= 0 {
		opts.MaxPerTopic = DefaultMaxPerTopic
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	if opts.Partitions <= 0 {
		opts.Partitions = DefaultPartitions
	}
	if opts.Partitions > MaxPartitions {
		return nil, fmt.Errorf("jetstream: history: %d partitions, at most %d", opts.Partitions, MaxPartitions)
	}
	if opts.Stream == "" {
		opts.Stream = nameToken(opts.Prefix) + "_history"
	}
	if opts.DuplicateWindow <= 0 {
		opts.DuplicateWindow = DefaultDuplicateWindow
	}
	if opts.AckTimeout <= 0 {
		opts.AckTimeout = DefaultAckTimeout
	}
	if opts.PageMaxBytes <= 0 {
		opts.PageMaxBytes = DefaultPageMaxBytes
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxAge > 0 && opts.DuplicateWindow > opts.MaxAge {
		opts.DuplicateWindow = opts.MaxAge // JetStream refuses a window past MaxAge
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	h := &History{
		nc:     js.Conn(),
		js:     js,
		opts:   opts,
		api:    jsAPIPrefix(js),
		idBase: hex.EncodeToString(b[:]) + "-",
	}
	for i := range opts.Partitions {
		name := opts.Stream + "_" + strconv.Itoa(i)
		h.parts = append(h.parts, &partition{
			index:     i,
			name:      name,
			subjects:  opts.Prefix + ".h." + strconv.Itoa(i) + ".",
			directGet: h.api + "DIRECT.GET." + name,
			lock:      make(chan struct{}, 1),
		})
	}
	var err error
	if h.reads, h.pipe, err = newInbox(h.nc, opts.MaxInFlight); err != nil {
		return nil, err
	}
	if !opts.Eager {
		return h, nil // created on first use
	}
	// One attempt now, so that a bad configuration fails here; a JetStream
	// that is not ready yet (a cluster still forming) is retried lazily.
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := h.ensureAll(actx); err != nil && permanent(err) {
		_ = h.Close()
		return nil, err
	}
	return h, nil
}

// Close stops the History's reply subscription: reads in progress and
// later ones fail. It does not close the NATS connection, and Append keeps
// working, without the pipeline (one request per attempt; Appends waiting
// for an ack when Close is called go on that way).
func (h *History) Close() error {
	h.pipe.close()
	return h.reads.close()
}

// AppendsInFlight returns how many pipelined Appends are waiting for their
// acks.
func (h *History) AppendsInFlight() int { return h.pipe.inFlight() }

// BatchesInFlight returns how many direct get batches of history reads
// are waiting for their answers.
func (h *History) BatchesInFlight() int { return h.reads.pending() }

// Stream returns the streams' base name (partition i is "<name>_<i>").
func (h *History) Stream() string { return h.opts.Stream }

// Streams returns the names of every partition's stream.
func (h *History) Streams() []string {
	out := make([]string, len(h.parts))
	for i, p := range h.parts {
		out[i] = p.name
	}
	return out
}

// StreamOf returns the name of the stream that keeps topic's messages.
func (h *History) StreamOf(topic string) string { return h.partition(topic).name }

// SubjectOf returns the subject topic's messages are stored on.
func (h *History) SubjectOf(topic string) string { return h.partition(topic).subject(topic) }

// StreamConfig returns the configuration the History keeps for the stream
// of the given partition (0 ≤ partition < Partitions).
func (h *History) StreamConfig(partition int) jetstream.StreamConfig {
	p := h.parts[partition]
	maxBytes := int64(-1)
	if h.opts.MaxBytes > 0 {
		maxBytes = max(1, h.opts.MaxBytes/int64(len(h.parts)))
	}
	return jetstream.StreamConfig{
		Name:              p.name,
		Description:       fmt.Sprintf("Fabric history of persistent topics, partition %d of %d", p.index, len(h.parts)),
		Subjects:          []string{p.subjects + "*"},
		Storage:           jetstream.FileStorage,
		Replicas:          h.opts.Replicas,
		MaxMsgsPerSubject: int64(h.opts.MaxPerTopic),
		MaxAge:            h.opts.MaxAge,
		MaxBytes:          maxBytes,
		MaxMsgs:           -1,
		Discard:           jetstream.DiscardOld,
		Duplicates:        h.opts.DuplicateWindow,
		AllowDirect:       true,
		RePublish: &jetstream.RePublish{
			// wildcard(1) is the source's first (and only) '*': the token.
			Source:      p.subjects + "*",
			Destination: h.opts.Prefix + ".t.{{wildcard(1)}}",
		},
	}
}

// partition returns topic's partition: the 32-bit fnv-1a hash of the
// topic's bytes mod their number, the same on every instance with the same
// number.
func (h *History) partition(topic string) *partition {
	x := uint32(2166136261)
	for i := 0; i < len(topic); i++ {
		x ^= uint32(topic[i])
		x *= 16777619
	}
	return h.parts[x%uint32(len(h.parts))]
}

// subject returns the subject that keeps topic's messages in p.
func (p *partition) subject(topic string) string { return p.subjects + SubjectToken(topic) }

// ready makes sure p's stream exists (once: a stream deleted later is
// recreated by Append).
func (h *History) ready(ctx context.Context, p *partition) error {
	if p.ensured.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, DefaultAckTimeout)
	defer cancel()
	return h.ensure(ctx, p, time.Time{})
}

// ensureAll ensures every partition's stream, in parallel. It returns the
// first refusal (see permanent) if any, else the first other failure.
func (h *History) ensureAll(ctx context.Context) error {
	errs := make([]error, len(h.parts))
	var wg sync.WaitGroup
	for i, p := range h.parts {
		wg.Go(func() { errs[i] = h.ensure(ctx, p, time.Time{}) })
	}
	wg.Wait()
	var first error
	for _, err := range errs {
		if err != nil && permanent(err) {
			return err
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// ensure creates p's stream, or brings an existing one to the configured
// limits, and records its epoch, unless that was done after the time
// after (zero: unless it was ever done). A JetStream still electing a
// leader is retried until ctx ends; so is waiting for another ensure of p.
func (h *History) ensure(ctx context.Context, p *partition, after time.Time) error {
	select {
	case p.lock <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("jetstream: history stream %s: %w", p.name, ctx.Err())
	}
	defer func() { <-p.lock }()
	p.mu.Lock()
	done := p.ensured.Load() && (after.IsZero() || p.ensuredAt.After(after))
	p.mu.Unlock()
	if done {
		return nil
	}
	cfg := h.StreamConfig(p.index)
	for {
		s, err := h.js.CreateOrUpdateStream(ctx, cfg)
		if err == nil {
			p.mu.Lock()
			p.ensuredAt = time.Now()
			p.mu.Unlock()
			p.setEpoch(s.CachedInfo().Created)
			p.ensured.Store(true)
			return nil
		}
		if permanent(err) {
			if errors.Is(err, nats.ErrNoResponders) {
				err = fmt.Errorf("%w: nothing answers the JetStream API: jetstream not enabled on the NATS server?", err)
			}
			return fmt.Errorf("jetstream: history stream %s: %w", p.name, err)
		}
		t := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			if !errors.Is(err, ctx.Err()) {
				err = fmt.Errorf("%w (%w)", err, ctx.Err())
			}
			return fmt.Errorf("jetstream: history stream %s: %w", p.name, err)
		case <-t.C:
		}
	}
}

// setEpoch records the epoch of a stream created at created: its creation
// time in nanoseconds, base 36.
func (p *partition) setEpoch(created time.Time) string {
	e := strconv.FormatInt(created.UnixNano(), 36)
	p.mu.Lock()
	p.epoch, p.epochAt = e, time.Now()
	p.mu.Unlock()
	return e
}

func (p *partition) cachedEpoch() (string, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.epoch, p.epochAt
}

// Append implements fabric.History: it stores the envelope with a message id
// and waits for the ack; attempts that time out (AckTimeout), or meet a
// JetStream without a leader, are retried with the same id until ctx ends,
// and a partition stream that was deleted is recreated (a new epoch for its
// topics). An error that means "try again later" (ctx ended, no leader, no
// JetStream answering, a connection being re-established, JetStream's
// ingest queue full) wraps fabric.ErrBackendUnavailable; a refusal (a bad
// configuration) does not.
//
// Appends are pipelined: each publishes its message and waits for its own
// ack only, while concurrent Appends (of any topic) are published behind
// it on the same connection, at most MaxInFlight awaiting acks at once.
// Sequential Appends of one topic are stored in call order; concurrent
// ones in the order they reach the stream, which is the order of their
// sequences and of their delivery (see appendPipe for the details).
func (h *History) Append(ctx context.Context, topic string, envelope []byte, msgID string) (fabric.Position, error) {
	p := h.partition(topic)
	if err := h.ready(ctx, p); err != nil {
		return fabric.Position{}, fmt.Errorf("jetstream: store %q: %w", clip(topic), unavailableErr(ctx, err))
	}
	subj := p.subject(topic)
	// JetStream deduplicates per stream, and a partition holds many topics:
	// the caller's id is qualified by the topic's token.
	var id string
	if msgID != "" {
		id = "u:" + SubjectToken(topic) + ":" + msgID
	} else {
		var b [40]byte
		id = string(strconv.AppendUint(append(b[:0], h.idBase...), h.nextID.Add(1), 36))
	}
	backoff := 50 * time.Millisecond
	missing := 0 // attempts in a row that found no stream
	for attempt := 1; ; attempt++ {
		sent := time.Now()
		seq, err := h.pipe.publish(ctx, subj, id, envelope, h.opts.AckTimeout)
		if errors.Is(err, errPipeClosed) {
			seq, err = h.publishSync(ctx, subj, id, envelope)
		}
		if err == nil {
			epoch, _ := p.cachedEpoch()
			return fabric.Position{Seq: seq, Epoch: epoch}, nil
		}
		fail := func(err error) (fabric.Position, error) {
			return fabric.Position{}, fmt.Errorf("jetstream: store %q (attempt %d): %w", clip(topic), attempt, unavailableErr(ctx, err))
		}
		if ctx.Err() != nil {
			return fail(err)
		}
		if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
			// The stream is gone (deleted, or not yet known to a new
			// cluster) or has no leader: recreate it (its epoch changes),
			// unless another Append just did, and try again: at once the
			// first time, then backing off.
			if eerr := h.ensure(ctx, p, sent); eerr != nil {
				return fail(eerr)
			}
			if missing++; missing == 1 {
				continue
			}
		} else if missing = 0; !transient(err) {
			return fail(err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fail(err)
		case <-t.C:
		}
		backoff = min(backoff*2, time.Second)
	}
}

// publishSync is one attempt without the pipeline (after Close): a request
// bounded by AckTimeout.
func (h *History) publishSync(ctx context.Context, subj, id string, envelope []byte) (uint64, error) {
	actx, cancel := context.WithTimeout(ctx, h.opts.AckTimeout)
	defer cancel()
	ack, err := h.js.PublishMsg(actx, &nats.Msg{Subject: subj, Data: envelope, Header: nats.Header{nats.MsgIdHdr: []string{id}}})
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

// transient reports whether err means "try again later": a timeout, no
// responders, no leader, a connection being re-established, JetStream
// temporarily unavailable.
func transient(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected) ||
		errors.Is(err, nats.ErrReconnectBufExceeded) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) {
		return true
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		const (
			notEnabled            = 10076 // JetStream not enabled: configuration
			insufficientResources = 10023 // storage full or too small: operator
			streamOffline         = 10118
		)
		switch {
		case apiErr.ErrorCode == notEnabled || apiErr.ErrorCode == insufficientResources:
			return false
		case apiErr.Code == 503 || apiErr.Code == 429 || apiErr.ErrorCode == streamOffline:
			return true // unavailable, ingest queue full (429), offline
		}
	}
	msg := err.Error()
	return strings.Contains(msg, "no suitable peers") || strings.Contains(msg, "leader")
}

// unavailableErr wraps err with fabric.ErrBackendUnavailable when it means
// "try again later" (see transient, or ctx's deadline passed), and returns
// a refusal unchanged.
func unavailableErr(ctx context.Context, err error) error {
	if err == nil || errors.Is(err, fabric.ErrBackendUnavailable) {
		return err
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || transient(err) {
		return fmt.Errorf("%w: %w", fabric.ErrBackendUnavailable, err)
	}
	return err
}

// Epoch implements fabric.History: the creation time, in base 36, of the
// stream of topic's partition, read again at most once a second (by one
// caller at a time: the others get the cached value meanwhile; while
// JetStream cannot answer, the cached value for up to epochGrace). A
// partition stream found deleted is recreated, so that the epoch returned
// is the one the topic's next message gets.
func (h *History) Epoch(ctx context.Context, topic string) (string, error) {
	return h.epochOf(ctx, h.partition(topic))
}

func (h *History) epochOf(ctx context.Context, p *partition) (string, error) {
	if err := h.ready(ctx, p); err != nil {
		return "", fmt.Errorf("jetstream: history epoch: %w", unavailableErr(ctx, err))
	}
	e, at := p.cachedEpoch()
	if time.Since(at) < time.Second || !p.refresh.CompareAndSwap(false, true) {
		return e, nil
	}
	defer p.refresh.Store(false)
	asked := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 2*leaderTimeout)
	s, err := h.js.Stream(sctx, p.name)
	cancel()
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		// Deleted: recreate it now (unless an Append just did), so that
		// the epoch returned is the one the topic's next message gets.
		ectx, cancel := context.WithTimeout(ctx, DefaultAckTimeout)
		defer cancel()
		if err := h.ensure(ectx, p, asked); err != nil {
			return "", fmt.Errorf("jetstream: history epoch: %w", unavailableErr(ectx, err))
		}
		e, _ = p.cachedEpoch()
		return e, nil
	}
	if err != nil {
		if e != "" && transient(err) && time.Since(at) < epochGrace {
			return e, nil // JetStream busy or electing: the epoch it just had
		}
		return e, fmt.Errorf("jetstream: history epoch of %s: %w", p.name, unavailableErr(ctx, err))
	}
	return p.setEpoch(s.CachedInfo().Created), nil
}

// epochGrace is how long a cached epoch still answers while JetStream
// cannot be asked (a leader election, an overloaded server).
const epochGrace = 10 * time.Second

// Last implements fabric.History. On a replicated history it asks the
// stream leader (read-after-write: an Append acknowledged anywhere is
// counted); otherwise a direct get answers.
func (h *History) Last(ctx context.Context, topic string) (fabric.Position, error) {
	p := h.partition(topic)
	epoch, err := h.epochOf(ctx, p)
	if err != nil {
		return fabric.Position{}, err
	}
	subj := p.subject(topic)
	var seq uint64
	if h.opts.Replicas > 1 {
		seq, err = h.leaderLastSeq(ctx, &lagWait{}, p, subj)
	} else {
		seq, err = h.lastSeq(ctx, p, subj)
	}
	if err != nil {
		return fabric.Position{Epoch: epoch}, fmt.Errorf("jetstream: last seq of %q: %w", clip(topic), err)
	}
	return fabric.Position{Seq: seq, Epoch: epoch}, nil
}

func (h *History) lastSeq(ctx context.Context, p *partition, subj string) (uint64, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	req := fmt.Appendf(nil, `{"last_by_subj":%q}`, subj)
	m, err := h.nc.RequestWithContext(ctx, p.directGet, req)
	if errors.Is(err, nats.ErrNoResponders) {
		return 0, nil // no stream: nothing retained
	}
	if err != nil {
		return 0, unavailableErr(ctx, err)
	}
	if st := m.Header.Get(statusHdr); st != "" {
		if st == "404" {
			return 0, nil
		}
		return 0, fmt.Errorf("direct get: status %s %s", st, m.Header.Get(descrHdr))
	}
	return strconv.ParseUint(m.Header.Get(nats.JSSequence), 10, 64)
}

// withDefaultTimeout bounds a ctx without a deadline by DefaultAckTimeout.
func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, DefaultAckTimeout)
}

// Lag bounds: how long a read waits, in total, for the replica answering
// its direct gets to catch up with the stream leader (or for a stream
// leader to be elected), the backoff between its tries, and how long one
// request to the leader may take.
const (
	lagPatience   = 3 * time.Second
	lagFirstPause = 5 * time.Millisecond
	lagMaxPause   = 100 * time.Millisecond
	leaderTimeout = time.Second
)

// errLagging reports a replica that stayed behind the leader for longer
// than lagPatience.
var errLagging = errors.New("the replica answering reads stays behind the stream leader")

// lagWait paces the retries of one read waiting for a lagging replica.
type lagWait struct {
	start time.Time
	pause time.Duration
}

func (l *lagWait) wait(ctx context.Context) error {
	now := time.Now()
	if l.start.IsZero() {
		l.start, l.pause = now, lagFirstPause
	}
	if now.Sub(l.start) >= lagPatience {
		return errLagging
	}
	t := time.NewTimer(l.pause)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	}
	l.pause = min(2*l.pause, lagMaxPause)
	return nil
}

// Since implements fabric.History with batched direct gets (up to 512
// messages and PageMaxBytes a batch): its cost grows with the messages
// returned and the messages of other topics of the same partition stored
// between them, not with the number of topics.
//
// The read starts at seq itself: if that message is still there, nothing
// after it can have been dropped (limits drop a topic's oldest first).
// When the answer lacks seq, the stream leader is asked whether it has
// message seq on the topic's subject: if it does, the replica that
// answered lags (a direct get may be answered by a follower, or a mirror)
// and the read is tried again, waiting up to lagPatience in all; only a
// seq the leader no longer has makes the Range incomplete. On a replicated
// history the read also asks the leader for the topic's last sequence
// first and reads until it has reached it.
func (h *History) Since(ctx context.Context, topic string, seq uint64, limit int) (fabric.Range, error) {
	p := h.partition(topic)
	epoch, err := h.epochOf(ctx, p)
	if err != nil {
		return fabric.Range{}, err
	}
	rng := fabric.Range{Complete: true, Epoch: epoch}
	subj := p.subject(topic)
	fail := func(err error) (fabric.Range, error) {
		return rng, fmt.Errorf("jetstream: history of %q after %d: %w", clip(topic), seq, err)
	}
	var lag lagWait
	var leaderLast uint64
	if h.opts.Replicas > 1 {
		if leaderLast, err = h.leaderLastSeq(ctx, &lag, p, subj); err != nil {
			return fail(err)
		}
	}
	from := max(seq, 1)
	checkFirst := seq > 0 // the first answer must begin with seq itself
	for {
		n := resumePage
		if limit > 0 {
			n = min(n, limit-len(rng.Messages))
		}
		if checkFirst {
			n++
		}
		msgs, pending, err := h.reads.getBatch(ctx, p.directGet, subj, from, n, h.opts.PageMaxBytes)
		if errors.Is(err, errNoStream) {
			// No stream (deleted), or no replica answering yet: as if
			// empty, which the leader checks below tell apart.
			msgs, pending, err = nil, 0, nil
		}
		if err != nil {
			return fail(unavailableErr(ctx, err))
		}
		got := len(msgs)
		if got > 0 {
			from = msgs[got-1].Seq + 1
		}
		if checkFirst {
			if got > 0 && msgs[0].Seq == seq {
				msgs = msgs[1:]
			} else {
				// Dropped, or the replica that answered has not stored it
				// yet: the leader tells which.
				stored, err := h.storedAt(ctx, &lag, p, subj, seq)
				if err != nil {
					return fail(err)
				}
				if stored {
					if err := lag.wait(ctx); err != nil {
						return fail(fmt.Errorf("%w (it has not stored %d yet)", err, seq))
					}
					from = seq
					continue
				}
				rng.Complete = false
			}
			checkFirst = false
		}
		rng.Messages = append(rng.Messages, msgs...)
		last := seq
		if len(rng.Messages) > 0 {
			last = rng.Messages[len(rng.Messages)-1].Seq
		}
		if limit > 0 && len(rng.Messages) >= limit {
			rng.More = len(rng.Messages) > limit || pending > 0 || last < leaderLast
			rng.Messages = rng.Messages[:limit]
			return rng, nil
		}
		if got > 0 && pending > 0 {
			continue
		}
		if last >= leaderLast {
			return rng, nil
		}
		if err := lag.wait(ctx); err != nil { // a follower catching up
			return fail(fmt.Errorf("%w (at %d of %d)", err, last, leaderLast))
		}
	}
}

// leaderMsg is what the stream leader says of one message.
type leaderMsg struct {
	Subject string `json:"subject"`
	Seq     uint64 `json:"seq"`
}

// leaderGet asks p's stream leader (read-after-write, unlike a direct get)
// for one message; nil when there is none (or no stream). One attempt,
// bounded by leaderTimeout.
func (h *History) leaderGet(ctx context.Context, p *partition, req []byte) (*leaderMsg, error) {
	ctx, cancel := context.WithTimeout(ctx, leaderTimeout)
	defer cancel()
	m, err := h.nc.RequestWithContext(ctx, h.api+"STREAM.MSG.GET."+p.name, req)
	if err != nil {
		return nil, fmt.Errorf("stream leader: %w", err)
	}
	var resp struct {
		Message *leaderMsg          `json:"message"`
		Error   *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return nil, fmt.Errorf("stream leader: %w", err)
	}
	switch {
	case resp.Error != nil && resp.Error.Code == 404:
		return nil, nil // no such message, or no stream
	case resp.Error != nil:
		return nil, fmt.Errorf("stream leader: %w", resp.Error)
	case resp.Message == nil:
		return nil, errors.New("stream leader: empty answer")
	}
	return resp.Message, nil
}

// askLeader is leaderGet tried again, within the read's lag budget, while
// the leader is being elected or does not answer.
func (h *History) askLeader(ctx context.Context, lag *lagWait, p *partition, req []byte) (*leaderMsg, error) {
	for {
		m, err := h.leaderGet(ctx, p, req)
		if err == nil || !transient(err) || ctx.Err() != nil {
			return m, err
		}
		if werr := lag.wait(ctx); werr != nil {
			return nil, unavailableErr(ctx, err)
		}
	}
}

// leaderLastSeq returns the last sequence the leader has stored on subj, 0
// if none.
func (h *History) leaderLastSeq(ctx context.Context, lag *lagWait, p *partition, subj string) (uint64, error) {
	m, err := h.askLeader(ctx, lag, p, fmt.Appendf(nil, `{"last_by_subj":%q}`, subj))
	if err != nil || m == nil {
		return 0, err
	}
	return m.Seq, nil
}

// storedAt reports whether the leader has message seq, on subj.
func (h *History) storedAt(ctx context.Context, lag *lagWait, p *partition, subj string, seq uint64) (bool, error) {
	m, err := h.askLeader(ctx, lag, p, fmt.Appendf(nil, `{"seq":%d}`, seq))
	if err != nil || m == nil {
		return false, err
	}
	return m.Subject == subj, nil
}

// resumePage is the most messages one direct get batch asks for.
const resumePage = 512

// jsAPIPrefix returns the JetStream API subject prefix of js ("$JS.API."),
// honouring its domain or API prefix.
func jsAPIPrefix(js jetstream.JetStream) string {
	o := js.Options()
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		if strings.HasSuffix(o.APIPrefix, ".") {
			return o.APIPrefix
		}
		return o.APIPrefix + "."
	}
	return jetstream.DefaultAPIPrefix
}

// Headers of direct get answers (nats.go keeps its names for them unexported).
const (
	statusHdr     = "Status"
	descrHdr      = "Description"
	numPendingHdr = "Nats-Num-Pending"
)
