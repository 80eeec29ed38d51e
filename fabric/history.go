package fabric

import (
	"context"
	"errors"
	"strconv"
)

// ErrNoHistory is returned for history operations on a Node without a History.
var ErrNoHistory = errors.New("fabric: no history backend is configured (persistent topics need one)")

// Persist keeps this message in the topic's history even when the topic
// does not match the persistent patterns. It needs a History.
func Persist() PublishOption { return func(o *PublishOptions) { o.Persist = true } }

// History returns the node's history backend, or nil.
func (n *Node) History() History { return n.cfg.History }

// Seq returns topic's last sequence in the history (0 when none): what a
// page's load function hands the client to resume from.
func (n *Node) Seq(ctx context.Context, topic string) (uint64, error) {
	if n.cfg.History == nil {
		return 0, ErrNoHistory
	}
	if err := ValidateTopic(topic); err != nil {
		return 0, err
	}
	pos, err := n.cfg.History.Last(ctx, topic)
	return pos.Seq, err
}

// Since returns up to limit retained messages of topic after seq (see
// History.Since). Its cost grows with the messages returned.
func (n *Node) Since(ctx context.Context, topic string, seq uint64, limit int) (Range, error) {
	if n.cfg.History == nil {
		return Range{}, ErrNoHistory
	}
	if err := ValidateTopic(topic); err != nil {
		return Range{}, err
	}
	return n.cfg.History.Since(ctx, topic, seq, limit)
}

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

// Replay answers the svelte-adapter-uws replay request: c's retained
// messages of topic after since go out as "msg" events on "__replay:"+topic,
// then an "end" event with the ResumeResult. Live messages of topic reaching
// c meanwhile are held and merged in, so that nothing published during the
// replay falls between the replay and the live stream (the client drops live
// messages until "end"). epoch, when not empty, is the epoch since came
// from. Without a History the answer is an empty "end".
func (n *Node) Replay(ctx context.Context, c *Client, topic string, since uint64, epoch string) (ResumeResult, error) {
	if err := ValidateTopic(topic); err != nil {
		return ResumeResult{}, err
	}
	return n.resume(ctx, c, topic, since, epoch, false)
}

// SubscribeSince subscribes c to topic and first sends it every retained
// message after since, as ordinary envelopes with their seq, then goes live
// with no gap and no duplicate at the seam, even while messages are being
// published. An "end" event on "__replay:"+topic tells the client the
// ResumeResult. A failing history still subscribes c and reports
// recovered:false.
func (n *Node) SubscribeSince(ctx context.Context, c *Client, topic string, since uint64, epoch string) (ResumeResult, error) {
	if err := ValidateTopic(topic); err != nil {
		return ResumeResult{}, err
	}
	return n.resume(ctx, c, topic, since, epoch, true)
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
		n.sendEnd(c, replayTopic, res)
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
	if err == nil && epoch != "" && epoch != cur {
		from, res.Recovered, res.Seq = 0, false, 0
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
			rng, err := h.Since(ctx, topic, after, resumePage)
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
		if cached, ok := n.hub.tailSince(topic, from); ok {
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
			n.sendEnd(c, replayTopic, res)
			return first, res.Seq, true
		})
		if done {
			return res, nil
		}
		if err = read(false); err != nil {
			n.log.Warn("resume: history read failed", "topic", topic, "err", err)
		}
	}
}

func (n *Node) sendEnd(c *Client, replayTopic string, res ResumeResult) {
	data := make([]byte, 0, 64+len(res.Epoch))
	data = append(data, `{"seq":`...)
	data = strconv.AppendUint(data, res.Seq, 10)
	data = append(data, `,"epoch":`...)
	data = strconv.AppendQuote(data, res.Epoch)
	data = append(data, `,"recovered":`...)
	data = strconv.AppendBool(data, res.Recovered)
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
