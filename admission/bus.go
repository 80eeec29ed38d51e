package admission

import "github.com/fabricrt/fabric/fabric"

// LocalSubjects returns every topic with subscribers on node and their
// count there, most subscribed first (the seed's bus.localSubjects). It
// walks the node's topics: O(local topics).
func LocalSubjects(node *fabric.Node) []SubjectCount {
	var out []SubjectCount
	node.Topics(func(topic string, n int) {
		out = append(out, SubjectCount{Topic: topic, Count: n})
	})
	sortSubjects(out)
	return out
}

// Bus is the sharded bus's view of subscriber counts (the seed's
// createShardedBus counts): Fabric's hub already keeps one sharded
// subscriber set per topic on each instance, and Bus reads it, alone or
// through an Aggregator for the cluster-wide sum.
//
// These counts are cheap and eventually consistent (within the
// aggregator's PublishInterval). For exact cluster-wide counts (audit,
// billing) ask the backend's fabric.ClusterView (Connections, Subscribers,
// Channels): a round trip to every instance per question.
type Bus struct {
	node *fabric.Node
	agg  *Aggregator
}

// NewBus returns node's counting view; with agg (nil: none), Subscribers
// is cluster-wide. Give agg Subjects: bus.LocalSubjects so that it carries
// this instance's counts.
func NewBus(node *fabric.Node, agg *Aggregator) *Bus { return &Bus{node: node, agg: agg} }

// LocalSubjects returns this instance's topics and subscriber counts, most
// subscribed first (see the function LocalSubjects).
func (b *Bus) LocalSubjects() []SubjectCount { return LocalSubjects(b.node) }

// Subscribers returns topic's subscriber count: cluster-wide
// (Aggregator.SubscribersOf) when an aggregator is wired, this instance's
// live count otherwise.
func (b *Bus) Subscribers(topic string) int {
	if b.agg != nil {
		return b.agg.SubscribersOf(topic)
	}
	return b.node.Subscribers(topic)
}
