package fabric

import "context"

// Broker carries envelopes between instances. Every backend (NATS, Redis)
// implements it; the conformance suite in fabrictest checks the contract.
type Broker interface {
	// Publish sends an envelope to every instance subscribed to topic.
	// It may buffer: a nil error means accepted for sending, not delivered.
	Publish(ctx context.Context, topic string, envelope []byte) error
	// Subscribe feeds topic's messages to r until the subscription is
	// stopped. Messages of one topic reach r in publish order, one at a time.
	Subscribe(topic string, r Receiver) (Subscription, error)
	// Close stops every subscription and releases the broker's goroutines.
	Close() error
}

// Receiver takes messages from a Broker subscription.
type Receiver interface {
	// Receive handles one envelope; seq is its history sequence, or 0, and
	// prev the sequence of the topic's previous stored message (0: none),
	// or UnknownSeq when the backend cannot tell. The envelope is only
	// valid during the call.
	Receive(envelope []byte, seq, prev uint64)
}

// Subscription is one topic's feed from a Broker.
type Subscription interface {
	// Unsubscribe stops the feed.
	Unsubscribe() error
}

// UnknownSeq is the prev a Broker passes when it does not know a message's
// predecessor in the topic's history.
const UnknownSeq = ^uint64(0)
