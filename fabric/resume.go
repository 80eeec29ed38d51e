package fabric

import (
	"context"
	"strconv"
	"sync"
	"time"
)

// ResumeResult is what a resume told the client in its "end" event.
type ResumeResult struct {
	// Seq is the last sequence the client now has (the since it sent when
	// nothing newer was retained).
	Seq uint64 `json:"seq"`
	// Epoch is the history's current epoch.
	Epoch string `json:"epoch"`
	// Recovered is false when messages after since were already gone or
	// since belonged to another epoch: the client should reload.
	Recovered bool `json:"recovered"`
	// Replayed counts the messages sent from history and from the seam.
	Replayed int `json:"-"`
}

// ReplayTopicPrefix starts the topic on which replays of topic T arrive:
// "__replay:" + T, events "msg" ({seq, event, data}) then "end".
const ReplayTopicPrefix = "__replay:"

// ResumeRequest is a client's request to catch up on a persistent topic.
type ResumeRequest struct {
	// Topic is the topic to resume.
	Topic string
	// Since is the last sequence the client has (0: none).
	Since uint64
	// Epoch is the epoch Since came from ("" when the client has none).
	Epoch string
	// Subscribe subscribes the client and sends the missed messages as
	// ordinary envelopes with their seq (subscribe with since); otherwise
	// they go out as "msg" events on "__replay:"+Topic (the
	// svelte-adapter-uws replay plugin). Either way an "end" event on
	// "__replay:"+Topic carries the ResumeResult, and live messages of the
	// topic reaching the client meanwhile are held and merged in, so that
	// nothing falls between the history and the live stream and nothing
	// arrives twice.
	Subscribe bool
}

// ResumeLimits bound what clients can make an instance read from history.
// The zero value has the defaults.
type ResumeLimits struct {
	// MaxConcurrentReads caps history reads in flight on this instance
	// (default 32); further reads wait for a slot.
	MaxConcurrentReads int
	// Queue caps the resumes one connection may have waiting (default 64):
	// a connection's resumes run one at a time, in order, and one past the
	// queue is refused with RATE_LIMITED.
	Queue int
	// Rate is the resumes per second one connection may start, sustained
	// (default 20), with bursts of Burst (default 100: a page reconnecting
	// with many persistent topics); more are refused with RATE_LIMITED.
	Rate  float64
	Burst int
}

// Defaults of ResumeLimits.
const (
	DefaultMaxConcurrentReads = 32
	DefaultResumeQueue        = 64
	DefaultResumeRate         = 20
	DefaultResumeBurst        = 100
)

func (l *ResumeLimits) setDefaults() {
	if l.MaxConcurrentReads <= 0 {
		l.MaxConcurrentReads = DefaultMaxConcurrentReads
	}
	if l.Queue <= 0 {
		l.Queue = DefaultResumeQueue
	}
	if l.Rate <= 0 {
		l.Rate = DefaultResumeRate
	}
	if l.Burst <= 0 {
		l.Burst = DefaultResumeBurst
	}
}

// resumeState is one connection's resume queue and rate bucket.
type resumeState struct {
	mu      sync.Mutex
	queue   []pendingResume
	running bool
	tokens  float64
	last    time.Time
}

type pendingResume struct {
	ctx  context.Context
	req  ResumeRequest
	done func(ResumeResult, error)
}

// Resume catches c up on req.Topic (see ResumeRequest) without blocking the
// caller: the request joins c's queue, which a goroutine of the node works
// through one request at a time, and done (which may be nil) is called
// there with the result. A request past the connection's rate or queue (see
// ResumeLimits) is refused at once with a RATE_LIMITED *LiveError, and the
// client is told so: a replay gets an "end" with recovered:false and the
// error code, a subscribe with since nothing (the transport denies the
// subscribe). ctx bounds the work; cancel it when the connection ends.
func (n *Node) Resume(ctx context.Context, c *Client, req ResumeRequest, done func(ResumeResult, error)) error {
	if err := ValidateTopic(req.Topic); err != nil {
		return err
	}
	if n.closed.Load() {
		return ErrNodeClosed
	}
	s := &c.resume
	lim := &n.cfg.ResumeLimits
	s.mu.Lock()
	now := time.Now()
	if s.last.IsZero() {
		s.tokens = float64(lim.Burst)
	} else {
		s.tokens = min(float64(lim.Burst), s.tokens+now.Sub(s.last).Seconds()*lim.Rate)
	}
	s.last = now
	var refused string
	switch {
	case s.tokens < 1:
		refused = "rate"
	case len(s.queue) >= lim.Queue:
		refused = "queue"
	}
	if refused != "" {
		retry := time.Duration((1 - s.tokens) / lim.Rate * float64(time.Second))
		s.mu.Unlock()
		n.metrics.ResumesRefused.WithLabelValues(refused).Inc()
		le := RateLimitedError(retry)
		le.Message = "Too many resumes"
		if !req.Subscribe {
			n.sendEnd(c, ReplayTopicPrefix+req.Topic, ResumeResult{Seq: req.Since, Epoch: req.Epoch}, le)
		}
		return le
	}
	s.tokens--
	s.queue = append(s.queue, pendingResume{ctx, req, done})
	start := !s.running
	s.running = true
	s.mu.Unlock()
	if start {
		n.resumeWG.Add(1)
		go n.runResumes(c)
	}
	return nil
}

// runResumes works through c's queue and exits when it is empty.
func (n *Node) runResumes(c *Client) {
	defer n.resumeWG.Done()
	s := &c.resume
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			s.running = false
			s.queue = nil
			s.mu.Unlock()
			return
		}
		p := s.queue[0]
		s.queue[0] = pendingResume{}
		s.queue = s.queue[1:]
		s.mu.Unlock()
		res, err := n.resume(p.ctx, c, p.req.Topic, p.req.Since, p.req.Epoch, p.req.Subscribe)
		if p.done != nil {
			p.done(res, err)
		}
	}
}

// cached returns the messages of topic after from that this instance's
// tail holds, when it can vouch for them in epoch (see tail.since): a chain
// no resume has checked yet is compared with the store's last position
// first (one cheap read, once per chain).
func (n *Node) cached(ctx context.Context, topic string, from uint64, epoch string) ([]*Message, bool) {
	tl := n.hub.tailOf(topic)
	if tl == nil {
		return nil, false
	}
	msgs, ok, unchecked := tl.since(from, epoch)
	if !unchecked {
		return msgs, ok
	}
	last, err := n.cfg.History.Last(ctx, topic)
	if err != nil {
		return nil, false
	}
	tl.adopt(epoch, last)
	msgs, ok, _ = tl.since(from, epoch)
	return msgs, ok
}

// acquireRead takes one of the instance's history read slots.
func (n *Node) acquireRead(ctx context.Context) error {
	select {
	case n.reads <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *Node) releaseRead() { <-n.reads }

// readHistory is History.Since under one of the instance's read slots.
func (n *Node) readHistory(ctx context.Context, topic string, seq uint64, limit int) (Range, error) {
	if err := n.acquireRead(ctx); err != nil {
		return Range{}, err
	}
	defer n.releaseRead()
	return n.cfg.History.Since(ctx, topic, seq, limit)
}

// DefaultResumeHold bounds the live messages held for one topic of one
// client during a resume; past it they are dropped and read again from the
// history.
const DefaultResumeHold = 8192

// resumePage is how many messages one history read returns.
const resumePage = 512

func (n *Node) resume(ctx context.Context, c *Client, topic string, since uint64, epoch string, subscribe bool) (ResumeResult, error) {
	h := n.cfg.History
	res := ResumeResult{Seq: since, Recovered: since == 0 && epoch == ""}
	replayTopic := ReplayTopicPrefix + topic
	if h == nil {
		if subscribe {
			if err := n.Subscribe(c, topic); err != nil {
				return res, err
			}
		}
		res.Seq = 0
		n.sendEnd(c, replayTopic, res, nil)
		return res, nil
	}
	c.holdTopic(topic)
	if subscribe {
		if err := n.Subscribe(c, topic); err != nil {
			c.releaseTopic(topic, false, func([]*Message, bool) (uint64, uint64, bool) { return 0, 0, true })
			return res, err
		}
	}
	n.hub.barrier(topic) // no delivery that missed the hold is still on its way
	res.Recovered = true
	cur, err := h.Epoch(ctx, topic)
	res.Epoch = cur
	from := since
	newEpoch := false
	if err == nil && epoch != "" && epoch != cur {
		from, res.Recovered, res.Seq = 0, false, 0
		newEpoch = true
	}
	var first uint64 // the first sequence sent
	send := func(s Stored) {
		var m *Message
		if subscribe {
			m = NewMessage(topic, s.Seq, WithSeq(s.Envelope, s.Seq))
		} else if env := replayMsg(replayTopic, s.Seq, s.Envelope); env != nil {
			m = NewMessage(replayTopic, s.Seq, env)
		}
		if m != nil && c.transport.Deliver(m) {
			n.metrics.MessagesOut.Inc()
		}
		res.Seq = s.Seq
		if first == 0 {
			first = s.Seq
		}
		res.Replayed++
	}
	// emit sends a message as live delivery framed it (with its seq).
	emit := func(m *Message) {
		if subscribe {
			if c.transport.Deliver(m) {
				n.metrics.MessagesOut.Inc()
			}
		} else if env := replayMsg(replayTopic, m.Seq, stripSeq(m.Payload)); env != nil {
			if c.transport.Deliver(NewMessage(replayTopic, m.Seq, env)) {
				n.metrics.MessagesOut.Inc()
			}
		}
		if m.Seq > res.Seq {
			res.Seq = m.Seq
		}
		if first == 0 {
			first = m.Seq
		}
		res.Replayed++
	}
	// read sends every retained message after res.Seq (from, at first).
	read := func(first bool) error {
		after := from
		if !first {
			after = res.Seq
		}
		for {
			rng, err := n.readHistory(ctx, topic, after, resumePage)
			if err != nil {
				return err
			}
			if first && !rng.Complete {
				res.Recovered = false
			}
			first = false
			for _, s := range rng.Messages {
				send(s)
			}
			if !rng.More || len(rng.Messages) == 0 {
				return nil
			}
			after = res.Seq
		}
	}
	if err == nil {
		if cached, ok := n.cached(ctx, topic, from, cur); ok {
			n.metrics.Resumes.WithLabelValues("cache").Inc()
			for _, m := range cached {
				emit(m)
			}
		} else {
			n.metrics.Resumes.WithLabelValues("store").Inc()
			err = read(true)
		}
	}
	if err != nil {
		n.log.Warn("resume: history read failed", "topic", topic, "since", since, "err", err)
		res.Recovered = false
	}
	// Close the seam: under the hold lock, send the held live messages the
	// history read did not cover, then let live messages through. When the
	// hold overflowed, read the history again (outside the lock) first.
	// The first re-read keeps the cap; the next ones hold whatever arrives,
	// so that a resume converges even when messages come faster than a
	// capped hold can absorb during one read.
	for round := 0; ; round++ {
		done := c.releaseTopic(topic, round >= 1, func(held []*Message, overflowed bool) (uint64, uint64, bool) {
			if overflowed && err == nil {
				n.metrics.ResumeRereads.Inc()
				return 0, 0, false
			}
			if overflowed {
				res.Recovered = false
			}
			for _, m := range held {
				if m.Seq != 0 && m.Seq <= res.Seq {
					continue // already replayed: no duplicate at the seam
				}
				emit(m)
			}
			n.sendEnd(c, replayTopic, res, nil)
			// In the client's epoch everything up to res.Seq is either what
			// it had before (up to since) or what was just sent: a late live
			// copy of any of them is a duplicate (the instance's live feed
			// can trail the store). In a new epoch only the replayed range
			// is known; lower sequences are new messages.
			low := uint64(1)
			if newEpoch {
				low = first
			}
			return low, res.Seq, true
		})
		if done {
			return res, nil
		}
		if err = read(false); err != nil {
			n.log.Warn("resume: history read failed", "topic", topic, "err", err)
		}
	}
}

// sendEnd sends the "end" event of a resume; a refused resume carries its
// error code (and retryAfter, in milliseconds) as well.
func (n *Node) sendEnd(c *Client, replayTopic string, res ResumeResult, refused *LiveError) {
	data := make([]byte, 0, 96+len(res.Epoch))
	data = append(data, `{"seq":`...)
	data = strconv.AppendUint(data, res.Seq, 10)
	data = append(data, `,"epoch":`...)
	data = appendJSONString(data, res.Epoch)
	data = append(data, `,"recovered":`...)
	data = strconv.AppendBool(data, res.Recovered)
	if refused != nil {
		data = append(data, `,"error":`...)
		data = appendJSONString(data, refused.Code)
		if refused.RetryAfter > 0 {
			data = append(data, `,"retryAfter":`...)
			data = strconv.AppendInt(data, refused.RetryAfter, 10)
		}
	}
	data = append(data, '}')
	if c.transport.Deliver(NewMessage(replayTopic, 0, Envelope(replayTopic, "end", data))) {
		n.metrics.MessagesOut.Inc()
	}
}

// replayMsg builds {"topic":"__replay:T","event":"msg","data":{"seq":N,
// "event":E,"data":D}} from a stored envelope; nil if it is not one.
func replayMsg(replayTopic string, seq uint64, envelope []byte) []byte {
	_, event, data, ok := SplitEnvelope(envelope)
	if !ok {
		return nil
	}
	out := make([]byte, 0, len(replayTopic)+len(event)+len(data)+80)
	out = append(out, `{"topic":"`...)
	out = append(out, replayTopic...)
	out = append(out, `","event":"msg","data":{"seq":`...)
	out = strconv.AppendUint(out, seq, 10)
	out = append(out, `,"event":"`...)
	out = append(out, event...)
	out = append(out, `","data":`...)
	out = append(out, data...)
	return append(out, "}}"...)
}

// stripSeq undoes WithSeq: it returns envelope without its trailing
// ,"seq":N field (or unchanged when there is none).
func stripSeq(envelope []byte) []byte {
	const key = `,"seq":`
	i := len(envelope) - 2 // before the closing brace
	for i >= 0 && envelope[i] >= '0' && envelope[i] <= '9' {
		i--
	}
	if i < len(key)-1 || string(envelope[i-len(key)+1:i+1]) != key {
		return envelope
	}
	out := make([]byte, 0, i-len(key)+2)
	out = append(out, envelope[:i-len(key)+1]...)
	return append(out, '}')
}
