package admission

import (
	"errors"
	"fmt"

	"github.com/fabricrt/fabric/fabric"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultMetricsTopN is how many topics the publish-rate wirers export.
const DefaultMetricsTopN = 10

// RateMetricsOptions configures WirePublishRateMetrics and
// WireClusterPublishRateMetrics.
type RateMetricsOptions struct {
	// TopN bounds the topics exported, most published first (default 10):
	// it bounds the label cardinality.
	TopN int
	// MapTopic maps a topic to its label value (topics that carry user or
	// session ids map to a bounded set); topics mapped to one value are
	// summed. Default: the topic itself.
	MapTopic func(topic string) string
}

// WirePublishRateMetrics exports node's own top publishers (its pressure
// sample) as fabric_topic_publish_rate{topic} and
// fabric_topic_publish_bytes{topic} gauges, read at scrape time: nothing is
// counted on the publish path for them. It may be wired together with
// WireClusterPublishRateMetrics: the local view shows a hot shard, the
// cluster one global load.
func WirePublishRateMetrics(node *fabric.Node, reg prometheus.Registerer, opts RateMetricsOptions) error {
	if node == nil || reg == nil {
		return errors.New("admission: WirePublishRateMetrics: nil node or registerer")
	}
	return register(reg, &rateCollector{opts: opts.withDefaults(),
		rate:  prometheus.NewDesc("fabric_topic_publish_rate", "This instance's top publishers: messages per second published, by topic, over the last pressure sample.", []string{"topic"}, nil),
		bytes: prometheus.NewDesc("fabric_topic_publish_bytes", "This instance's top publishers: envelope bytes per second published, by topic.", []string{"topic"}, nil),
		read: func() []ClusterTopicRate {
			top := node.Pressure().TopPublishers
			out := make([]ClusterTopicRate, len(top))
			for i, r := range top {
				out[i] = ClusterTopicRate{Topic: r.Topic, MessagesPerSec: r.MessagesPerSec, BytesPerSec: r.BytesPerSec}
			}
			return out
		},
	})
}

// WireClusterPublishRateMetrics exports the aggregator's merged view as
// cluster_topic_publish_rate{topic} and cluster_topic_publish_bytes{topic}
// (messages and bytes per second summed over the instances), read at
// scrape time.
func WireClusterPublishRateMetrics(agg *Aggregator, reg prometheus.Registerer, opts RateMetricsOptions) error {
	if agg == nil || reg == nil {
		return errors.New("admission: WireClusterPublishRateMetrics: nil aggregator or registerer")
	}
	return register(reg, &rateCollector{opts: opts.withDefaults(),
		rate:  prometheus.NewDesc("cluster_topic_publish_rate", "Cluster-wide messagesPerSec, summed across instances.", []string{"topic"}, nil),
		bytes: prometheus.NewDesc("cluster_topic_publish_bytes", "Cluster-wide bytesPerSec, summed across instances.", []string{"topic"}, nil),
		read:  agg.TopPublishers,
	})
}

func (o RateMetricsOptions) withDefaults() RateMetricsOptions {
	if o.TopN <= 0 {
		o.TopN = DefaultMetricsTopN
	}
	if o.MapTopic == nil {
		o.MapTopic = func(t string) string { return t }
	}
	return o
}

func register(reg prometheus.Registerer, c prometheus.Collector) error {
	if err := reg.Register(c); err != nil {
		return fmt.Errorf("admission: registering publish-rate metrics: %w", err)
	}
	return nil
}

type rateCollector struct {
	opts        RateMetricsOptions
	rate, bytes *prometheus.Desc
	read        func() []ClusterTopicRate
}

// Describe implements prometheus.Collector.
func (c *rateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.rate
	ch <- c.bytes
}

// Collect implements prometheus.Collector.
func (c *rateCollector) Collect(ch chan<- prometheus.Metric) {
	top := c.read()
	top = top[:min(len(top), c.opts.TopN)]
	type sums struct{ m, b float64 }
	byLabel := make(map[string]*sums, len(top))
	var order []string
	for _, r := range top {
		l := c.opts.MapTopic(r.Topic)
		s := byLabel[l]
		if s == nil {
			s = &sums{}
			byLabel[l] = s
			order = append(order, l)
		}
		s.m += r.MessagesPerSec
		s.b += r.BytesPerSec
	}
	for _, l := range order {
		ch <- prometheus.MustNewConstMetric(c.rate, prometheus.GaugeValue, byLabel[l].m, l)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, byLabel[l].b, l)
	}
}
