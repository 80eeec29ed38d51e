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
)

// HistoryOptions configures NewHistory. The zero value keeps 200 messages
// per topic, forever, in a stream created on first use.
type HistoryOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric").
	Prefix string
	// Eager creates the stream in NewHistory, so that a configuration the
	// server refuses (replicas it cannot place, no JetStream) fails there;
	// otherwise it is created on first use. A JetStream that is not ready
	// yet (a cluster still forming) is retried lazily either way.
	Eager bool
	// MaxPerTopic is how many messages each topic keeps (default 200).
	MaxPerTopic int
	// MaxAge drops messages older than this (default: none; the per-topic
	// limit alone bounds a live topic, MaxAge also clears dead ones).
	MaxAge time.Duration
	// MaxBytes bounds the whole stream (default: unlimited).
	MaxBytes int64
	// Replicas is the stream's replication factor on clustered JetStream
	// (default 1).
	Replicas int
	// Stream is the stream's name (default "<prefix>_history").
	Stream string
	// DuplicateWindow is how long a retried publish is recognised as one
	// (default 2m).
	DuplicateWindow time.Duration
	// AckTimeout bounds each attempt to store a message (default 5s); a
	// timed-out attempt is retried with the same message id until the
	// publish's context ends, so a retry never stores a duplicate.
	AckTimeout time.Duration
}

// History is fabric.History on a JetStream stream: one subject per topic
// ("<prefix>.h.<token>") with a per-subject limit, so each topic keeps its
// own last N. The stream republishes every stored message onto the topic's
// live subject with its sequence, which is how subscribers on every
// instance get it; resumes read with batched direct gets, no consumers.
type History struct {
	nc        *nats.Conn
	js        jetstream.JetStream
	opts      HistoryOptions
	directGet string // "$JS.API.DIRECT.GET.<stream>"
	idBase    string
	nextID    atomic.Uint64

	mu       sync.Mutex
	epoch    string
	epochAt  time.Time
	ensureMu sync.Mutex
	ensured  atomic.Bool
}

// NewHistory creates or updates the history stream and returns the History.
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
	if opts.Stream == "" {
		opts.Stream = nameToken(opts.Prefix) + "_history"
	}
	if opts.DuplicateWindow <= 0 {
		opts.DuplicateWindow = DefaultDuplicateWindow
	}
	if opts.AckTimeout <= 0 {
		opts.AckTimeout = DefaultAckTimeout
	}
	if opts.MaxAge > 0 && opts.DuplicateWindow > opts.MaxAge {
		opts.DuplicateWindow = opts.MaxAge // JetStream refuses a window past MaxAge
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	h := &History{
		nc:        js.Conn(),
		js:        js,
		opts:      opts,
		directGet: jsAPIPrefix(js) + "DIRECT.GET." + opts.Stream,
		idBase:    hex.EncodeToString(b[:]) + "-",
	}
	if !opts.Eager {
		return h, nil // created on first use
	}
	// One attempt now, so that a bad configuration fails here; a JetStream
	// that is not ready yet (a cluster still forming) is retried lazily.
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := h.ensure(actx); err != nil && permanent(err) {
		return nil, err
	}
	return h, nil
}

// ready makes sure the stream exists (once).
func (h *History) ready(ctx context.Context) error {
	if h.ensured.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, DefaultAckTimeout)
	defer cancel()
	return h.ensure(ctx)
}

// Stream returns the history stream's name.
func (h *History) Stream() string { return h.opts.Stream }

// StreamConfig returns the stream configuration the History keeps.
func (h *History) StreamConfig() jetstream.StreamConfig {
	p := h.opts.Prefix
	return jetstream.StreamConfig{
		Name:              h.opts.Stream,
		Description:       "Fabric history of persistent topics",
		Subjects:          []string{p + ".h.*"},
		Storage:           jetstream.FileStorage,
		Replicas:          h.opts.Replicas,
		MaxMsgsPerSubject: int64(h.opts.MaxPerTopic),
		MaxAge:            h.opts.MaxAge,
		MaxBytes:          orUnlimited(h.opts.MaxBytes),
		MaxMsgs:           -1,
		Discard:           jetstream.DiscardOld,
		Duplicates:        h.opts.DuplicateWindow,
		AllowDirect:       true,
		RePublish: &jetstream.RePublish{
			Source:      p + ".h.*",
			Destination: p + ".t.{{wildcard(1)}}",
		},
	}
}

func orUnlimited(n int64) int64 {
	if n <= 0 {
		return -1
	}
	return n
}

// ensure creates the stream, or brings an existing one to the configured
// limits, and records its epoch. A JetStream still electing a leader is
// retried until ctx ends.
func (h *History) ensure(ctx context.Context) error {
	h.ensureMu.Lock()
	defer h.ensureMu.Unlock()
	var last error
	for {
		s, err := h.js.CreateOrUpdateStream(ctx, h.StreamConfig())
		if err == nil {
			h.setEpoch(s.CachedInfo())
			h.ensured.Store(true)
			return nil
		}
		last = err
		if permanent(err) {
			if errors.Is(err, nats.ErrNoResponders) {
				err = fmt.Errorf("%w: nothing answers the JetStream API: jetstream not enabled on the NATS server?", err)
			}
			return fmt.Errorf("jetstream: history stream %s: %w", h.opts.Stream, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jetstream: history stream %s: %w", h.opts.Stream, last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (h *History) setEpoch(info *jetstream.StreamInfo) {
	h.mu.Lock()
	h.epoch = strconv.FormatInt(info.Created.UnixNano(), 36)
	h.epochAt = time.Now()
	h.mu.Unlock()
}

// Append implements fabric.History: it stores the envelope with a message id
// and waits for the ack; attempts that time out, or meet a JetStream without
// a leader, are retried with the same id until ctx ends, and a stream that
// was deleted is recreated.
func (h *History) Append(ctx context.Context, topic string, envelope []byte) (fabric.Position, error) {
	if err := h.ready(ctx); err != nil {
		return fabric.Position{}, err
	}
	subj := h.opts.Prefix + ".h." + SubjectToken(topic)
	id := h.idBase + strconv.FormatUint(h.nextID.Add(1), 36)
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, h.opts.AckTimeout)
		ack, err := h.js.PublishMsg(actx, &nats.Msg{Subject: subj, Data: envelope, Header: nats.Header{nats.MsgIdHdr: []string{id}}})
		cancel()
		if err == nil {
			h.mu.Lock()
			epoch := h.epoch
			h.mu.Unlock()
			return fabric.Position{Seq: ack.Sequence, Epoch: epoch}, nil
		}
		if ctx.Err() != nil {
			return fabric.Position{}, fmt.Errorf("jetstream: store %q (attempt %d): %w", topic, attempt, err)
		}
		if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
			// The stream is gone (deleted, or not yet known to a new
			// cluster): recreate it. Its epoch changes.
			if eerr := h.ensure(ctx); eerr != nil {
				return fabric.Position{}, fmt.Errorf("jetstream: store %q: %w", topic, eerr)
			}
		} else if !retryable(err) {
			return fabric.Position{}, fmt.Errorf("jetstream: store %q: %w", topic, err)
		}
		select {
		case <-ctx.Done():
			return fabric.Position{}, fmt.Errorf("jetstream: store %q (attempt %d): %w", topic, attempt, err)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, time.Second)
	}
}

func retryable(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected) ||
		strings.Contains(err.Error(), "no suitable peers") || strings.Contains(err.Error(), "leader")
}

// Epoch implements fabric.History: the stream's creation time in base 36,
// read again at most once a second.
func (h *History) Epoch(ctx context.Context, _ string) (string, error) {
	if err := h.ready(ctx); err != nil {
		return "", err
	}
	h.mu.Lock()
	e, at := h.epoch, h.epochAt
	h.mu.Unlock()
	if time.Since(at) < time.Second {
		return e, nil
	}
	s, err := h.js.Stream(ctx, h.opts.Stream)
	if err != nil {
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return "", nil // no stream: no history, every sequence is stale
		}
		return e, fmt.Errorf("jetstream: history epoch: %w", err)
	}
	h.setEpoch(s.CachedInfo())
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.epoch, nil
}

// Last implements fabric.History.
func (h *History) Last(ctx context.Context, topic string) (fabric.Position, error) {
	epoch, err := h.Epoch(ctx, topic)
	if err != nil {
		return fabric.Position{}, err
	}
	seq, err := h.lastSeq(ctx, topic)
	return fabric.Position{Seq: seq, Epoch: epoch}, err
}

func (h *History) lastSeq(ctx context.Context, topic string) (uint64, error) {
	subj := h.opts.Prefix + ".h." + SubjectToken(topic)
	req := fmt.Sprintf(`{"last_by_subj":%q}`, subj)
	m, err := h.nc.RequestWithContext(ctx, h.directGet, []byte(req))
	if errors.Is(err, nats.ErrNoResponders) {
		return 0, nil // no stream: nothing retained
	}
	if err != nil {
		return 0, fmt.Errorf("jetstream: last seq of %q: %w", topic, err)
	}
	if st := m.Header.Get(statusHdr); st != "" {
		if st == "404" {
			return 0, nil
		}
		return 0, fmt.Errorf("jetstream: last seq of %q: status %s %s", topic, st, m.Header.Get(descrHdr))
	}
	return strconv.ParseUint(m.Header.Get(nats.JSSequence), 10, 64)
}

// Since implements fabric.History with one batched direct get per page: its
// cost grows with the messages returned (and the stream blocks they sit
// in), not with the number of topics.
func (h *History) Since(ctx context.Context, topic string, seq uint64, limit int) (fabric.Range, error) {
	epoch, err := h.Epoch(ctx, topic)
	if err != nil {
		return fabric.Range{}, err
	}
	rng := fabric.Range{Complete: true, Epoch: epoch}
	subj := h.opts.Prefix + ".h." + SubjectToken(topic)
	// Read from seq itself: if that message is still there, nothing after it
	// can have been dropped (limits drop a topic's oldest first).
	from := seq
	if from == 0 {
		from = 1
	}
	checkFirst := seq > 0
	// A replicated stream's direct gets may be answered by a follower that
	// has not stored the newest messages yet: ask the leader for the
	// topic's last sequence first, and read until the answer reaches it.
	var leaderLast uint64
	if h.opts.Replicas > 1 {
		if leaderLast, err = h.leaderLastSeq(ctx, subj); err != nil {
			return rng, fmt.Errorf("jetstream: history of %q: %w", topic, err)
		}
	}
	lagRetries := 0
	for {
		n := resumePage
		if limit > 0 {
			n = min(n, limit-len(rng.Messages))
		}
		if checkFirst {
			n++
		}
		msgs, pending, err := h.getBatch(ctx, subj, from, n)
		if errors.Is(err, nats.ErrNoResponders) {
			// No stream (deleted, not recreated yet): nothing is retained.
			return fabric.Range{Complete: seq == 0}, nil
		}
		if err != nil {
			return rng, fmt.Errorf("jetstream: history of %q after %d: %w", topic, seq, err)
		}
		if checkFirst {
			checkFirst = false
			if len(msgs) == 0 || msgs[0].Seq != seq {
				rng.Complete = false
			} else {
				msgs = msgs[1:]
			}
		}
		rng.Messages = append(rng.Messages, msgs...)
		if limit > 0 && len(rng.Messages) >= limit {
			rng.More = len(rng.Messages) > limit || pending > 0
			rng.Messages = rng.Messages[:limit]
			return rng, nil
		}
		last := seq
		if len(rng.Messages) > 0 {
			last = rng.Messages[len(rng.Messages)-1].Seq
		}
		if pending == 0 || len(msgs) == 0 {
			if last >= leaderLast {
				return rng, nil
			}
			if lagRetries++; lagRetries > 40 {
				return rng, fmt.Errorf("jetstream: history of %q: the replica answering reads stays behind the leader (at %d of %d)", topic, last, leaderLast)
			}
			select { // a follower catching up
			case <-ctx.Done():
				return rng, ctx.Err()
			case <-time.After(25 * time.Millisecond):
			}
		}
		from = last + 1
	}
}

// leaderLastSeq asks the stream leader (read-after-write, unlike a direct
// get) for the last sequence stored on subj, 0 if none.
func (h *History) leaderLastSeq(ctx context.Context, subj string) (uint64, error) {
	req := fmt.Appendf(nil, `{"last_by_subj":%q}`, subj)
	m, err := h.nc.RequestWithContext(ctx, jsAPIPrefix(h.js)+"STREAM.MSG.GET."+h.opts.Stream, req)
	if err != nil {
		return 0, fmt.Errorf("last sequence from the leader: %w", err)
	}
	var resp struct {
		Message *struct {
			Seq uint64 `json:"seq"`
		} `json:"message"`
		Error *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, fmt.Errorf("last sequence from the leader: %w", err)
	}
	switch {
	case resp.Error != nil && resp.Error.Code == 404:
		return 0, nil // no message on subj
	case resp.Error != nil:
		return 0, fmt.Errorf("last sequence from the leader: %s (%d)", resp.Error.Description, resp.Error.ErrCode)
	case resp.Message == nil:
		return 0, errors.New("last sequence from the leader: empty answer")
	}
	return resp.Message.Seq, nil
}

// resumePage is the most messages one direct get batch asks for.
const resumePage = 512

// getBatch reads up to batch messages of subj from sequence from on, and the
// number still pending after them.
func (h *History) getBatch(ctx context.Context, subj string, from uint64, batch int) ([]fabric.Stored, uint64, error) {
	inbox := h.nc.NewRespInbox()
	sub, err := h.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	req := fmt.Appendf(nil, `{"seq":%d,"next_by_subj":%q,"batch":%d}`, from, subj, batch)
	if err := h.nc.PublishRequest(h.directGet, inbox, req); err != nil {
		return nil, 0, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultAckTimeout)
		defer cancel()
	}
	var out []fabric.Stored
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			return nil, 0, err
		}
		switch m.Header.Get(statusHdr) {
		case "":
		case "404": // nothing at or after from
			return out, 0, nil
		case "204": // end of batch
			pending, _ := strconv.ParseUint(m.Header.Get(numPendingHdr), 10, 64)
			return out, pending, nil
		case "503":
			return nil, 0, nats.ErrNoResponders
		default:
			return nil, 0, fmt.Errorf("direct get: status %s %s", m.Header.Get(statusHdr), m.Header.Get(descrHdr))
		}
		seq, err := strconv.ParseUint(m.Header.Get(nats.JSSequence), 10, 64)
		if err != nil {
			return nil, 0, fmt.Errorf("direct get: bad sequence header: %w", err)
		}
		out = append(out, fabric.Stored{Seq: seq, Envelope: m.Data})
	}
}

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
