package jetstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"
	"unsafe"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultMaxInFlight is HistoryOptions.MaxInFlight's default.
const DefaultMaxInFlight = 4096

// errPipeClosed reports an append the pipeline could not carry because
// History.Close shut its inbox: Append goes on with a synchronous publish
// (same message id, so an attempt already stored is not stored again).
var errPipeClosed = errors.New("jetstream: history append pipeline closed")

// appendPipe pipelines the History's appends. Each Append publishes its
// message with a reply subject on the History's shared inbox
// ("<inbox>.A<token>", the subscription of its replyMux) and waits there
// for JetStream's ack, while other Appends, of any topic and from any
// goroutine, are published behind it without waiting for it: the NATS
// connection coalesces them into large writes, the server reads them in
// batches, and the acks come back the same way. Nothing waits for a round
// trip per message but the caller of that message.
//
// At most MaxInFlight appends wait for their acks at once; more wait for a
// slot within their context. An ack that does not come within AckTimeout
// ends the attempt with a timeout, which Append retries with the same
// message id (stored once).
//
// Order: JetStream stores the messages of a partition in the order they
// reach its stream, and one connection delivers them in the order they
// were published, so the pipeline never reorders what one goroutine
// publishes. Appends of one topic made one after another (each waiting for
// the previous one's result, as Node.Publish does) get increasing
// sequences in call order. Concurrent Appends of one topic have no order
// between them (none is defined for concurrent calls): each gets the
// sequence of its arrival and subscribers see them in sequence order. An
// attempt retried after a timeout may be stored after Appends that started
// later; it is stored once.
type appendPipe struct {
	nc     *nats.Conn
	prefix string // "<inbox>.A"
	slots  chan struct{}
	pool   sync.Pool // of *pendingAppend

	mu    sync.Mutex
	calls map[uint64]*pendingAppend
	next  uint64
	shut  bool
}

// pendingAppend is one append waiting for its ack; it is reused (pooled) once
// its caller is done with it.
type pendingAppend struct {
	ch    chan ackResult // buffered 1: the reply handler never blocks
	timer *time.Timer
	msg   nats.Msg
	idv   []string // msg.Header[MsgIdHdr]
	reply []byte
}

// ackResult is what the stream answered.
type ackResult struct {
	seq uint64
	err error
}

// newInbox opens the History's one reply subscription, "<inbox>.*", and
// returns the replyMux of its reads and the appendPipe of its appends on
// it: a token starting with 'A' is an append's ack (read tokens are base
// 36 numbers), everything else an answer of a read. replyMux.close
// unsubscribes both; close the pipe first.
func newInbox(nc *nats.Conn, maxInFlight int) (*replyMux, *appendPipe, error) {
	x := &replyMux{nc: nc, prefix: nc.NewInbox() + ".", closed: make(chan struct{}), reads: make(map[string]*pageRead)}
	pipe := newAppendPipe(nc, x.prefix, maxInFlight)
	sub, err := nc.Subscribe(x.prefix+"*", func(m *nats.Msg) {
		if len(m.Subject) > len(pipe.prefix) && m.Subject[len(x.prefix)] == 'A' {
			pipe.onAck(m.Subject[len(pipe.prefix):], m)
			return
		}
		x.onReply(m)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("jetstream: history reply subscription: %w", err)
	}
	x.sub = sub
	return x, pipe, nil
}

func newAppendPipe(nc *nats.Conn, inbox string, maxInFlight int) *appendPipe {
	x := &appendPipe{nc: nc, prefix: inbox + "A", slots: make(chan struct{}, maxInFlight), calls: make(map[uint64]*pendingAppend)}
	x.pool.New = func() any {
		t := time.NewTimer(time.Hour)
		t.Stop()
		w := &pendingAppend{ch: make(chan ackResult, 1), timer: t, idv: make([]string, 1)}
		w.msg.Header = nats.Header{nats.MsgIdHdr: w.idv}
		return w
	}
	return x
}

// inFlight returns how many appends are waiting for their acks.
func (x *appendPipe) inFlight() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.calls)
}

// publish stores envelope on subj with message id id and returns the
// stream sequence it got: one attempt, bounded by timeout and ctx.
func (x *appendPipe) publish(ctx context.Context, subj, id string, envelope []byte, timeout time.Duration) (uint64, error) {
	select {
	case x.slots <- struct{}{}:
	default:
		select {
		case x.slots <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	defer func() { <-x.slots }()
	w := x.pool.Get().(*pendingAppend)
	x.mu.Lock()
	if x.shut {
		x.mu.Unlock()
		x.pool.Put(w)
		return 0, errPipeClosed
	}
	x.next++
	token := x.next
	x.calls[token] = w
	x.mu.Unlock()

	w.reply = strconv.AppendUint(append(w.reply[:0], x.prefix...), token, 36)
	w.idv[0] = id
	w.msg.Subject, w.msg.Data = subj, envelope
	// nats.go copies subject, reply, header and data into its write buffer
	// before PublishMsg returns, so w's buffers can be reused afterwards.
	w.msg.Reply = unsafeString(w.reply)
	err := x.nc.PublishMsg(&w.msg)
	w.msg.Subject, w.msg.Reply, w.msg.Data, w.idv[0] = "", "", nil, ""
	if err != nil {
		x.abandon(token, w)
		return 0, err
	}
	w.timer.Reset(timeout)
	var r ackResult
	select {
	case r = <-w.ch:
		w.timer.Stop()
	case <-ctx.Done():
		w.timer.Stop()
		x.abandon(token, w)
		return 0, ctx.Err()
	case <-w.timer.C:
		x.abandon(token, w)
		return 0, fmt.Errorf("%w: no ack within %s", nats.ErrTimeout, timeout)
	}
	x.pool.Put(w)
	return r.seq, r.err
}

// abandon unregisters w; if the reply handler has already taken it, its
// result is drained first, so that w goes back to the pool empty.
func (x *appendPipe) abandon(token uint64, w *pendingAppend) {
	x.mu.Lock()
	_, mine := x.calls[token]
	delete(x.calls, token)
	x.mu.Unlock()
	if !mine {
		<-w.ch // sent, or about to be, by onAck or close
	}
	x.pool.Put(w)
}

// onAck hands one ack (token: the reply subject after the prefix) to its
// append; acks of abandoned appends are dropped.
func (x *appendPipe) onAck(token string, m *nats.Msg) {
	t, err := strconv.ParseUint(token, 36, 64)
	if err != nil {
		return
	}
	x.mu.Lock()
	w := x.calls[t]
	delete(x.calls, t)
	x.mu.Unlock()
	if w != nil {
		w.ch <- parseAck(m)
	}
}

// close fails every append waiting for an ack with errPipeClosed (Append
// retries it synchronously) and refuses later ones.
func (x *appendPipe) close() {
	x.mu.Lock()
	x.shut = true
	calls := x.calls
	x.calls = make(map[uint64]*pendingAppend)
	x.mu.Unlock()
	for _, w := range calls {
		w.ch <- ackResult{err: errPipeClosed}
	}
}

var (
	ackPrefix = []byte(`{"stream":`)
	ackSeq    = []byte(`"seq":`)
	ackError  = []byte(`"error"`)
)

// parseAck reads a publish ack: {"stream":S,["domain":D,]"seq":N[,"duplicate": true]}
// on the fast path, anything else (an error, a status) the slow way.
func parseAck(m *nats.Msg) ackResult {
	d := m.Data
	if bytes.HasPrefix(d, ackPrefix) && !bytes.Contains(d, ackError) {
		if i := bytes.Index(d, ackSeq); i >= 0 {
			var seq uint64
			for _, c := range d[i+len(ackSeq):] {
				if c == ' ' && seq == 0 {
					continue
				}
				if c < '0' || c > '9' {
					break
				}
				seq = seq*10 + uint64(c-'0')
			}
			if seq > 0 {
				return ackResult{seq: seq}
			}
		}
	}
	if len(d) == 0 {
		switch st := m.Header.Get(statusHdr); st {
		case "503":
			return ackResult{err: jetstream.ErrNoStreamResponse}
		case "":
			return ackResult{err: jetstream.ErrInvalidJSAck}
		default:
			return ackResult{err: fmt.Errorf("jetstream: publish: status %s %s", st, m.Header.Get(descrHdr))}
		}
	}
	var resp struct {
		Error *jetstream.APIError `json:"error"`
		Seq   uint64              `json:"seq"`
	}
	if err := json.Unmarshal(d, &resp); err != nil {
		return ackResult{err: jetstream.ErrInvalidJSAck}
	}
	if resp.Error != nil {
		return ackResult{err: fmt.Errorf("nats: %w", resp.Error)}
	}
	if resp.Seq == 0 {
		return ackResult{err: jetstream.ErrInvalidJSAck}
	}
	return ackResult{seq: resp.Seq}
}

// unsafeString is b as a string, without a copy: b must not change while
// the string is in use.
func unsafeString(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }
