package fabric

import (
	"context"
	"errors"
)

// ErrNoHistory is returned for history operations on a Node without a History.
var ErrNoHistory = errors.New("fabric: no history backend is configured (persistent topics need one)")

// Persist keeps this message in the topic's history even when the topic
// does not match the persistent patterns. It needs a History.
func Persist() PublishOption { return func(o *PublishOptions) { o.Persist = true } }

// MsgID makes a publish to a persistent topic idempotent: a second publish
// with the same id on the same topic within the history's dedupe window
// (2 minutes on NATS and memory) stores and delivers nothing and returns
// the first one's seq. Use an id derived from the source (an outbox row's
// id, a request id) so that retries after a failure never duplicate. It
// has no effect on topics without history (at most once there).
func MsgID(id string) PublishOption { return func(o *PublishOptions) { o.MsgID = id } }

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
	return n.readHistory(ctx, topic, seq, limit)
}
