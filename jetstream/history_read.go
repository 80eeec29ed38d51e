package jetstream

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
)

// DefaultPageMaxBytes is HistoryOptions.PageMaxBytes' default.
const DefaultPageMaxBytes = 1 << 20

// errNoStream reports a direct get nobody answered: the stream does not
// exist (deleted, not recreated yet) or has no replica online.
var errNoStream = errors.New("no stream answers direct gets")

// errReplyLost reports a batch whose answers arrived with a gap: a reply
// was dropped on the way (the shared inbox subscription fell too far
// behind), so the page cannot be trusted.
var errReplyLost = errors.New("direct get: a reply of the batch was lost")

// errReadsClosed is returned by reads after History.Close.
var errReadsClosed = errors.New("jetstream: history closed")

// replyMux carries the answers of every batched direct get of one History
// on a single wildcard inbox subscription ("<inbox>.*"): each read
// registers under a token, sends its request with "<inbox>.<token>" as
// the reply subject, and the subscription's handler hands each answer to
// the read registered under the subject's last token. Answers for a token
// nobody waits for any more (a read its context abandoned) are dropped.
//
// nats.go calls the handler from one goroutine per subscription, stopped
// by Unsubscribe; the replyMux starts none of its own.
type replyMux struct {
	nc     *nats.Conn
	prefix string // "<inbox>."
	sub    *nats.Subscription
	closed chan struct{}

	mu    sync.Mutex
	reads map[string]*pageRead
	next  uint64
	shut  bool
}

// pageRead is one batched direct get waiting for its answers. Its fields
// are written by the subscription's handler only, until done is closed;
// the read looks at them only after that.
type pageRead struct {
	msgs    []fabric.Stored
	last    uint64 // sequence of the last message received (0: none)
	pending uint64 // from the end-of-batch marker
	err     error
	done    chan struct{}
	over    bool // done is closed: later answers are ignored
}

func newReplyMux(nc *nats.Conn) (*replyMux, error) {
	x := &replyMux{nc: nc, prefix: nc.NewInbox() + ".", closed: make(chan struct{}), reads: make(map[string]*pageRead)}
	sub, err := nc.Subscribe(x.prefix+"*", x.onReply)
	if err != nil {
		return nil, fmt.Errorf("jetstream: history reply subscription: %w", err)
	}
	x.sub = sub
	return x, nil
}

// close unsubscribes; reads still waiting return errReadsClosed.
func (x *replyMux) close() error {
	x.mu.Lock()
	if x.shut {
		x.mu.Unlock()
		return nil
	}
	x.shut = true
	close(x.closed)
	x.mu.Unlock()
	err := x.sub.Unsubscribe()
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
		return nil
	}
	return err
}

// pending returns how many reads are registered (for tests and metrics).
func (x *replyMux) pending() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.reads)
}

// getBatch reads up to batch messages of subj from sequence from on, with
// at most maxBytes of them (the server stops after the message that
// crosses it), and returns them with the number of subj's messages still
// pending after them.
func (x *replyMux) getBatch(ctx context.Context, directGet, subj string, from uint64, batch, maxBytes int) ([]fabric.Stored, uint64, error) {
	r := &pageRead{done: make(chan struct{})}
	x.mu.Lock()
	if x.shut {
		x.mu.Unlock()
		return nil, 0, errReadsClosed
	}
	x.next++
	token := strconv.FormatUint(x.next, 36)
	x.reads[token] = r
	x.mu.Unlock()
	defer func() {
		x.mu.Lock()
		delete(x.reads, token)
		x.mu.Unlock()
	}()
	req := fmt.Appendf(nil, `{"seq":%d,"next_by_subj":%q,"batch":%d,"max_bytes":%d}`, from, subj, batch, maxBytes)
	if err := x.nc.PublishRequest(directGet, x.prefix+token, req); err != nil {
		return nil, 0, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultAckTimeout)
		defer cancel()
	}
	select {
	case <-r.done:
		return r.msgs, r.pending, r.err
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	case <-x.closed:
		return nil, 0, errReadsClosed
	}
}

// onReply routes one answer to its read.
func (x *replyMux) onReply(m *nats.Msg) {
	token := m.Subject[min(len(x.prefix), len(m.Subject)):]
	x.mu.Lock()
	r := x.reads[token]
	x.mu.Unlock()
	if r == nil || r.over {
		return // abandoned, or an answer after the end: dropped
	}
	r.take(m)
}

// take records one answer of the batch. Every message of a batch names
// the sequence of the one sent before it (Nats-Last-Sequence, 0 for the
// first) and so does the end-of-batch marker: a mismatch means an answer
// was lost on the way.
func (r *pageRead) take(m *nats.Msg) {
	status := m.Header.Get(statusHdr)
	switch status {
	case "":
		seq, err := strconv.ParseUint(m.Header.Get(nats.JSSequence), 10, 64)
		if err != nil {
			r.finish(fmt.Errorf("direct get: bad sequence header: %w", err))
			return
		}
		if !r.follows(m) {
			r.finish(errReplyLost)
			return
		}
		r.msgs = append(r.msgs, fabric.Stored{Seq: seq, Envelope: m.Data})
		r.last = seq
	case "404": // nothing at or after the sequence asked for
		r.finish(nil)
	case "204": // end of batch
		if !r.follows(m) {
			r.finish(errReplyLost)
			return
		}
		r.pending, _ = strconv.ParseUint(m.Header.Get(numPendingHdr), 10, 64)
		r.finish(nil)
	case "503": // no responders
		r.finish(errNoStream)
	default:
		r.finish(fmt.Errorf("direct get: status %s %s", status, m.Header.Get(descrHdr)))
	}
}

// follows reports whether m's Nats-Last-Sequence is the last message taken.
func (r *pageRead) follows(m *nats.Msg) bool {
	v := m.Header.Get(nats.JSLastSequence)
	if v == "" {
		return true // a server that does not say: nothing to check
	}
	prev, err := strconv.ParseUint(v, 10, 64)
	return err == nil && prev == r.last
}

func (r *pageRead) finish(err error) {
	if err != nil {
		r.msgs = nil
	}
	r.err = err
	r.over = true
	close(r.done)
}
