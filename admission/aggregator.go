package admission

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults of AggregatorOptions.
const (
	// DefaultChannel is the system topic the slices travel on (the seed's
	// 'uws:pressure:rates'). On NATS it is the subject
	// <prefix>.t.__pressure:rates, so tenants with their own subject
	// prefix are already apart; Channel separates tenants sharing one.
	DefaultChannel         = "__pressure:rates"
	DefaultPublishInterval = 5 * time.Second
	DefaultStaleAfter      = 12 * time.Second
	DefaultTopN            = 20
	// DefaultMaxInstances bounds the remote instances tracked.
	DefaultMaxInstances = 1024
	// maxEnvelope bounds an envelope accepted on the channel.
	maxEnvelope = 1 << 20
	// maxTopicBytes bounds a topic name in a received slice.
	maxTopicBytes = 1024
)

// AggregatorOptions configures an Aggregator (the seed's
// createPublishRateAggregator options). The zero value has the defaults.
type AggregatorOptions struct {
	// Channel is the topic slices are broadcast on, through the node's
	// Broker (default DefaultChannel). Override it per tenant when
	// tenants share a broker namespace.
	Channel string
	// PublishInterval is how often this instance broadcasts its slice
	// (default 5s).
	PublishInterval time.Duration
	// StaleAfter drops a remote instance's slice when no fresher one
	// arrived within it (default 12s); at least 2×PublishInterval.
	StaleAfter time.Duration
	// TopN caps the slice broadcast, each slice kept, the merged result and
	// the subs broadcast (default 20).
	TopN int
	// Subjects, when set, contributes this instance's subscriber counts
	// (Bus.LocalSubjects): called on every broadcast and by SubscribersOf;
	// the envelope then carries subs.
	Subjects func() []SubjectCount
	// Breaker, when set, guards the broadcast's publish.
	Breaker *breaker.Breaker
	// Registerer receives the cluster_publish_rate_* metrics (the seed's
	// metrics); nil leaves them unregistered.
	Registerer prometheus.Registerer
	// InstanceID tags this instance's envelopes (default: 16 random hex
	// digits, fixed for the Aggregator's life).
	InstanceID string
	// MaxInstances bounds the remote instances tracked (default 1024);
	// envelopes of further instances are ignored until stale ones go.
	MaxInstances int
	// Logger receives warnings; nil uses the node's at Activate.
	Logger *slog.Logger
}

// SubjectCount is one topic's subscriber count on one instance.
type SubjectCount struct {
	Topic string `json:"topic"`
	Count int    `json:"count"`
}

// ClusterTopicRate is one topic's publish rate summed over the instances.
type ClusterTopicRate struct {
	Topic          string  `json:"topic"`
	MessagesPerSec float64 `json:"messagesPerSec"`
	BytesPerSec    float64 `json:"bytesPerSec"`
	// ContributingInstances is how many instances had the topic in their
	// last slice (this one included).
	ContributingInstances int `json:"contributingInstances"`
}

// Aggregator is the cluster-wide publish-rate view (the seed's
// createPublishRateAggregator). Every instance broadcasts its own
// Pressure().TopPublishers on Channel each PublishInterval and keeps the
// other instances' last slices; TopPublishers merges them with its own
// fresh one. There is no leader: every instance is its own aggregator, and
// its memory is O(instances × TopN).
//
// The channel is a topic of the node's fabric.Broker, so the aggregator
// runs on every backend (NATS, memory, ...) with no code of its own.
type Aggregator struct {
	opts AggregatorOptions
	id   string

	life   sync.Mutex // serializes Activate and Deactivate
	active bool
	sub    fabric.Subscription
	stop   chan struct{}
	done   chan struct{}

	mu       sync.Mutex
	node     *fabric.Node
	log      *slog.Logger
	gen      uint64 // activation generation; a receiver of another is ignored
	remote   map[string]*remoteSlice
	version  uint64 // bumped on every change of remote
	cache    mergeCache
	fullWarn bool

	broadcasts, received, parseErrors atomic.Uint64
	publishErrLogged                  atomic.Bool
}

type remoteSlice struct {
	at    time.Time // local receipt (monotonic): staleness does not depend on clocks agreeing
	ts    int64     // the sender's wall clock, ms
	slice []fabric.TopicRate
	subs  map[string]int // nil: the envelope had no subs
}

type mergeCache struct {
	valid      bool
	version    uint64
	localAt    time.Time
	validUntil time.Time
	list       []ClusterTopicRate
	byTopic    map[string]float64
}

// NewAggregator returns an inactive Aggregator; Activate starts it.
func NewAggregator(opts AggregatorOptions) (*Aggregator, error) {
	if opts.Channel == "" {
		opts.Channel = DefaultChannel
	}
	if opts.PublishInterval == 0 {
		opts.PublishInterval = DefaultPublishInterval
	}
	if opts.StaleAfter == 0 {
		opts.StaleAfter = DefaultStaleAfter
	}
	if opts.TopN == 0 {
		opts.TopN = DefaultTopN
	}
	if opts.MaxInstances == 0 {
		opts.MaxInstances = DefaultMaxInstances
	}
	switch {
	case opts.PublishInterval < 0 || opts.StaleAfter < 0 || opts.TopN < 0 || opts.MaxInstances < 0:
		return nil, errors.New("admission: AggregatorOptions: negative values are not allowed")
	case opts.StaleAfter < opts.PublishInterval:
		return nil, fmt.Errorf("admission: AggregatorOptions: StaleAfter %s is shorter than PublishInterval %s (want at least 2×)", opts.StaleAfter, opts.PublishInterval)
	}
	if err := fabric.ValidateTopic(opts.Channel); err != nil {
		return nil, fmt.Errorf("admission: AggregatorOptions.Channel: %w", err)
	}
	a := &Aggregator{opts: opts, id: opts.InstanceID, remote: map[string]*remoteSlice{}}
	if a.id == "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		a.id = hex.EncodeToString(b[:])
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(aggCollector{a}); err != nil {
			return nil, fmt.Errorf("admission: registering the aggregator metrics: %w", err)
		}
	}
	return a, nil
}

// InstanceID returns the id this instance's envelopes carry.
func (a *Aggregator) InstanceID() string { return a.id }

// Options returns the options in effect, defaults filled in.
func (a *Aggregator) Options() AggregatorOptions { return a.opts }

// Activate subscribes to the channel through node's Broker and starts the
// broadcasts (the first one PublishInterval later). It is idempotent: on an
// active Aggregator it only makes node the one whose slice is broadcast.
func (a *Aggregator) Activate(node *fabric.Node) error {
	if node == nil {
		return errors.New("admission: Activate: nil node")
	}
	a.life.Lock()
	defer a.life.Unlock()
	a.mu.Lock()
	a.node = node
	if a.log = a.opts.Logger; a.log == nil {
		a.log = node.Logger()
	}
	if a.active {
		a.mu.Unlock()
		return nil
	}
	a.gen++
	gen := a.gen
	a.mu.Unlock()
	sub, err := node.Broker().Subscribe(a.opts.Channel, aggReceiver{a, gen})
	if err != nil {
		return fmt.Errorf("admission: aggregator: subscribe %q: %w", a.opts.Channel, err)
	}
	a.sub, a.active = sub, true
	a.stop, a.done = make(chan struct{}), make(chan struct{})
	go a.run(a.stop, a.done)
	return nil
}

// Deactivate stops the broadcasts, drops the subscription and clears every
// cached slice. It is idempotent; Activate may follow.
func (a *Aggregator) Deactivate() {
	a.life.Lock()
	defer a.life.Unlock()
	if !a.active {
		return
	}
	a.active = false
	close(a.stop)
	<-a.done
	if err := a.sub.Unsubscribe(); err != nil {
		a.logger().Debug("aggregator: unsubscribe failed", "err", err)
	}
	a.sub = nil
	a.mu.Lock()
	a.gen++ // a Receive still under way is ignored
	clear(a.remote)
	a.version++
	a.cache = mergeCache{}
	a.node = nil
	a.mu.Unlock()
}

func (a *Aggregator) logger() *slog.Logger {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return a.log
}

func (a *Aggregator) run(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(a.opts.PublishInterval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			a.broadcast()
		}
	}
}

// wireSlice is the envelope on the channel:
// {instanceId, ts, slice: [{topic, messagesPerSec, bytesPerSec}], subs?: [{topic, count}]}.
type wireSlice struct {
	InstanceID string             `json:"instanceId"`
	TS         int64              `json:"ts"`
	Slice      []fabric.TopicRate `json:"slice"`
	Subs       *[]SubjectCount    `json:"subs,omitempty"`
}

// broadcast publishes this instance's slice once.
func (a *Aggregator) broadcast() {
	a.mu.Lock()
	node := a.node
	a.mu.Unlock()
	if node == nil {
		return
	}
	env := wireSlice{InstanceID: a.id, TS: time.Now().UnixMilli(), Slice: a.localSlice(node)}
	if a.opts.Subjects != nil {
		subs := a.localSubjects(true)
		env.Subs = &subs
	}
	b, err := json.Marshal(env)
	if err != nil { // floats are finite, strings valid: cannot fail
		a.logger().Error("aggregator: encoding the slice failed", "err", err)
		return
	}
	publish := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), a.opts.PublishInterval)
		defer cancel()
		return node.Broker().Publish(ctx, a.opts.Channel, b)
	}
	if a.opts.Breaker != nil {
		err = a.opts.Breaker.Do(publish)
	} else {
		err = publish()
	}
	if err != nil {
		// Best effort: this instance's slice is missing from the cluster
		// view for one interval.
		if !a.publishErrLogged.Swap(true) {
			a.logger().Warn("aggregator: broadcasting the slice failed (logged once until one succeeds)", "channel", a.opts.Channel, "err", err)
		}
		return
	}
	a.publishErrLogged.Store(false)
	a.broadcasts.Add(1)
}

// localSlice returns node's top publishers, at most TopN, never nil.
func (a *Aggregator) localSlice(node *fabric.Node) []fabric.TopicRate {
	top := node.Pressure().TopPublishers
	out := make([]fabric.TopicRate, 0, min(len(top), a.opts.TopN))
	return append(out, top[:min(len(top), a.opts.TopN)]...)
}

// localSubjects calls Subjects and returns its counts deduplicated by topic,
// most subscribed first, capped at TopN when capped.
func (a *Aggregator) localSubjects(capped bool) (out []SubjectCount) {
	defer func() {
		if p := recover(); p != nil {
			a.logger().Error("aggregator: the Subjects callback panicked", "panic", p)
			out = []SubjectCount{}
		}
	}()
	raw := a.opts.Subjects()
	sums := make(map[string]int, len(raw))
	for _, s := range raw {
		sums[s.Topic] += s.Count
	}
	out = make([]SubjectCount, 0, len(sums))
	for t, c := range sums {
		out = append(out, SubjectCount{t, c})
	}
	sortSubjects(out)
	if capped && len(out) > a.opts.TopN {
		out = out[:a.opts.TopN]
	}
	return out
}

func sortSubjects(s []SubjectCount) {
	slices.SortFunc(s, func(x, y SubjectCount) int {
		if x.Count != y.Count {
			return y.Count - x.Count
		}
		switch {
		case x.Topic < y.Topic:
			return -1
		case x.Topic > y.Topic:
			return 1
		}
		return 0
	})
}

// aggReceiver takes the channel's envelopes for one activation.
type aggReceiver struct {
	a   *Aggregator
	gen uint64
}

// Receive implements fabric.Receiver.
func (r aggReceiver) Receive(envelope []byte, _, _ uint64) { r.a.receive(envelope, r.gen) }

// receive merges one envelope; malformed ones are counted and dropped.
func (a *Aggregator) receive(envelope []byte, gen uint64) {
	rs, id, ok := parseSlice(envelope, a.opts.TopN)
	if !ok {
		a.parseErrors.Add(1)
		return
	}
	if id == a.id {
		return // our own broadcast
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if gen != a.gen {
		return
	}
	if _, known := a.remote[id]; !known && len(a.remote) >= a.opts.MaxInstances {
		a.pruneLocked(now)
		if len(a.remote) >= a.opts.MaxInstances {
			if !a.fullWarn {
				a.fullWarn = true
				a.log.Warn("aggregator: too many instances broadcasting; ignoring new ones until stale ones go",
					"max_instances", a.opts.MaxInstances, "channel", a.opts.Channel)
			}
			return
		}
	}
	// An envelope without subs (an older version, or no Subjects there)
	// replaces the instance's subscriber counts with none.
	rs.at = now
	a.remote[id] = rs
	a.version++
	a.received.Add(1)
}

// parseSlice decodes an envelope leniently: instanceId must be a non-empty
// string and slice an array; entries that are not {topic: string, ...} are
// skipped, numbers that are not are 0, subs is optional (ignored unless an
// array), ts falls back to 0.
func parseSlice(envelope []byte, topN int) (*remoteSlice, string, bool) {
	if len(envelope) > maxEnvelope {
		return nil, "", false
	}
	var env struct {
		InstanceID json.RawMessage `json:"instanceId"`
		TS         json.RawMessage `json:"ts"`
		Slice      json.RawMessage `json:"slice"`
		Subs       json.RawMessage `json:"subs"`
	}
	if err := json.Unmarshal(envelope, &env); err != nil {
		return nil, "", false
	}
	var id string
	if json.Unmarshal(env.InstanceID, &id) != nil || id == "" || len(id) > 256 {
		return nil, "", false
	}
	var entries []json.RawMessage
	if json.Unmarshal(env.Slice, &entries) != nil || entries == nil {
		return nil, "", false
	}
	rs := &remoteSlice{}
	var ts float64
	if json.Unmarshal(env.TS, &ts) == nil && !math.IsInf(ts, 0) {
		rs.ts = int64(ts)
	}
	for _, e := range entries {
		if len(rs.slice) >= topN {
			break
		}
		var r struct {
			Topic          *string         `json:"topic"`
			MessagesPerSec json.RawMessage `json:"messagesPerSec"`
			BytesPerSec    json.RawMessage `json:"bytesPerSec"`
		}
		if json.Unmarshal(e, &r) != nil || r.Topic == nil || !validTopic(*r.Topic) {
			continue
		}
		rs.slice = append(rs.slice, fabric.TopicRate{Topic: *r.Topic, MessagesPerSec: number(r.MessagesPerSec), BytesPerSec: number(r.BytesPerSec)})
	}
	var subs []json.RawMessage
	if len(env.Subs) > 0 && json.Unmarshal(env.Subs, &subs) == nil && subs != nil {
		rs.subs = make(map[string]int, min(len(subs), topN))
		for _, e := range subs {
			if len(rs.subs) >= topN {
				break
			}
			var s struct {
				Topic *string         `json:"topic"`
				Count json.RawMessage `json:"count"`
			}
			if json.Unmarshal(e, &s) != nil || s.Topic == nil || !validTopic(*s.Topic) {
				continue
			}
			rs.subs[*s.Topic] += int(min(number(s.Count), 1<<31))
		}
	}
	return rs, id, true
}

func validTopic(t string) bool { return len(t) <= maxTopicBytes && fabric.ValidateTopic(t) == nil }

// number returns raw as a finite number ≥ 0, or 0.
func number(raw json.RawMessage) float64 {
	var f float64
	if json.Unmarshal(raw, &f) != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		return 0
	}
	return f
}

// pruneLocked drops the slices older than StaleAfter; a.mu is held.
func (a *Aggregator) pruneLocked(now time.Time) {
	for id, rs := range a.remote {
		if now.Sub(rs.at) > a.opts.StaleAfter {
			delete(a.remote, id)
			a.version++
		}
	}
}

// TopPublishers returns the cluster-wide top publishers: this instance's
// fresh slice merged with every non-stale remote one, summed per topic,
// most messages per second first, at most TopN. It is computed in memory
// (and cached until something changes).
func (a *Aggregator) TopPublishers() []ClusterTopicRate {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.mergedLocked(time.Now()).list)
}

// RateOf returns topic's cluster-wide messages per second, or 0 when it is
// not in the merged top N (the ClusterTopPublisher rule's question).
func (a *Aggregator) RateOf(topic string) float64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mergedLocked(time.Now()).byTopic[topic]
}

// mergedLocked returns the merged view, recomputed when a slice changed,
// went stale, or this node took a new pressure sample; a.mu is held.
func (a *Aggregator) mergedLocked(now time.Time) *mergeCache {
	var local fabric.Pressure
	if a.node != nil {
		local = a.node.Pressure()
	}
	c := &a.cache
	if c.valid && c.version == a.version && c.localAt.Equal(local.SampledAt) && now.Before(c.validUntil) {
		return c
	}
	a.pruneLocked(now)
	merged := map[string]*ClusterTopicRate{}
	add := func(slice []fabric.TopicRate) {
		for _, r := range slice {
			m := merged[r.Topic]
			if m == nil {
				m = &ClusterTopicRate{Topic: r.Topic}
				merged[r.Topic] = m
			}
			m.MessagesPerSec += r.MessagesPerSec
			m.BytesPerSec += r.BytesPerSec
			m.ContributingInstances++
		}
	}
	if a.node != nil {
		add(local.TopPublishers[:min(len(local.TopPublishers), a.opts.TopN)])
	}
	validUntil := now.Add(a.opts.StaleAfter)
	for _, rs := range a.remote {
		add(rs.slice)
		if u := rs.at.Add(a.opts.StaleAfter); u.Before(validUntil) {
			validUntil = u
		}
	}
	list := make([]ClusterTopicRate, 0, len(merged))
	for _, m := range merged {
		list = append(list, *m)
	}
	slices.SortFunc(list, func(x, y ClusterTopicRate) int {
		switch {
		case x.MessagesPerSec > y.MessagesPerSec:
			return -1
		case x.MessagesPerSec < y.MessagesPerSec:
			return 1
		case x.Topic < y.Topic:
			return -1
		case x.Topic > y.Topic:
			return 1
		}
		return 0
	})
	list = list[:min(len(list), a.opts.TopN)]
	byTopic := make(map[string]float64, len(list))
	for _, r := range list {
		byTopic[r.Topic] = r.MessagesPerSec
	}
	*c = mergeCache{valid: true, version: a.version, localAt: local.SampledAt, validUntil: validUntil, list: list, byTopic: byTopic}
	return c
}

// SubscribersOf returns topic's cluster-wide subscriber count: this
// instance's live count from Subjects (0 without it) plus every non-stale
// remote instance's last reported count (each instance reports its TopN
// most subscribed topics). Eventually consistent within PublishInterval;
// it costs one Subjects call (O(local topics) for Bus.LocalSubjects).
func (a *Aggregator) SubscribersOf(topic string) int {
	total := 0
	a.mu.Lock()
	active := a.node != nil
	a.mu.Unlock()
	if active && a.opts.Subjects != nil {
		for _, s := range a.localSubjects(false) {
			if s.Topic == topic {
				total += s.Count
			}
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pruneLocked(time.Now())
	for _, rs := range a.remote {
		total += rs.subs[topic]
	}
	return total
}

// Instances returns how many remote instances contribute non-stale slices.
func (a *Aggregator) Instances() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pruneLocked(time.Now())
	return len(a.remote)
}

// AggregatorStats are an Aggregator's counters.
type AggregatorStats struct {
	Broadcasts, Received, ParseErrors uint64
}

// Stats returns the aggregator's counters (also its metrics).
func (a *Aggregator) Stats() AggregatorStats {
	return AggregatorStats{a.broadcasts.Load(), a.received.Load(), a.parseErrors.Load()}
}

// aggCollector exports an Aggregator's counters under the seed's names.
type aggCollector struct{ a *Aggregator }

var (
	aggBroadcastsDesc = prometheus.NewDesc("cluster_publish_rate_broadcasts_total", "Slice envelopes published by this instance.", nil, nil)
	aggReceivedDesc   = prometheus.NewDesc("cluster_publish_rate_received_total", "Slice envelopes received from sibling instances.", nil, nil)
	aggParseDesc      = prometheus.NewDesc("cluster_publish_rate_parse_errors_total", "Malformed envelopes dropped on receive.", nil, nil)
	aggInstancesDesc  = prometheus.NewDesc("cluster_publish_rate_instance_count", "Sibling instances contributing slices (excluding self).", nil, nil)
)

// Describe implements prometheus.Collector.
func (c aggCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- aggBroadcastsDesc
	ch <- aggReceivedDesc
	ch <- aggParseDesc
	ch <- aggInstancesDesc
}

// Collect implements prometheus.Collector.
func (c aggCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Stats()
	ch <- prometheus.MustNewConstMetric(aggBroadcastsDesc, prometheus.CounterValue, float64(s.Broadcasts))
	ch <- prometheus.MustNewConstMetric(aggReceivedDesc, prometheus.CounterValue, float64(s.Received))
	ch <- prometheus.MustNewConstMetric(aggParseDesc, prometheus.CounterValue, float64(s.ParseErrors))
	ch <- prometheus.MustNewConstMetric(aggInstancesDesc, prometheus.GaugeValue, float64(c.a.Instances()))
}
