package fabric

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// This file is the Node's pressure signals (docs/admission.md): memory
// against a limit, the rate of publishes made on this instance, and its
// subscriptions, sampled by a goroutine the Node owns. Node.Pressure reads
// the last sample; admission rules (package admission) decide from it.
//
// Publishes are counted per topic on the publish path with one map lookup
// in an immutable per-shard map and two atomic adds: no lock and no map
// write, except for the publishes of a topic in the first window it is
// published in.

// PressureReason names the pressure signal an instance is under.
type PressureReason string

// Pressure reasons, in precedence order: when several signals are on, Reason
// is the first of them (memory first: the process is nearest to being
// killed; then the publish rate, whose fan-out saturates the CPU fastest;
// subscriptions last, as heavy fan-out degrades gracefully).
const (
	PressureNone        PressureReason = "NONE"
	PressureMemory      PressureReason = "MEMORY"
	PressurePublishRate PressureReason = "PUBLISH_RATE"
	PressureSubscribers PressureReason = "SUBSCRIBERS"
)

// Memory sources of PressureOptions.MemorySource.
const (
	// MemoryRSS is the process's resident set size (/proc/self/statm):
	// what the kernel's OOM killer and a container's limit count.
	MemoryRSS = "rss"
	// MemoryGo is the memory the Go runtime holds from the OS (every
	// runtime memory class but released heap pages): what GOMEMLIMIT
	// limits.
	MemoryGo = "go"
)

// Defaults of PressureOptions.
const (
	DefaultPressureSampleInterval   = time.Second
	DefaultPressureMemoryRatio      = 0.85
	DefaultPressurePublishRate      = 50_000
	DefaultPressureMaxSubscriptions = 1_000_000
	DefaultPressureHysteresis       = 0.1
	DefaultPressureClearAfter       = 3
	DefaultPressureTopN             = 20
	DefaultPressureMaxTopics        = 10_000
	// MaxPressureSampleInterval bounds SampleInterval (the per-topic
	// counters hold one window).
	MaxPressureSampleInterval = 10 * time.Second
)

// PressureOptions configures a Node's pressure signals (Config.Pressure).
// The zero value has the defaults; a negative threshold turns its signal off.
type PressureOptions struct {
	// SampleInterval is how often the signals are sampled (default 1s, at
	// most 10s); the publish rate is measured over it. Negative turns sampling and
	// per-topic publish counting off: Pressure is then always NONE.
	SampleInterval time.Duration
	// MemoryLimit is the memory the instance may use, in bytes. Default:
	// GOMEMLIMIT when set, else the cgroup's memory limit when there is
	// one, else the machine's physical memory (none found: MEMORY is off).
	// Negative turns MEMORY off.
	MemoryLimit int64
	// MemoryRatio is the fraction of MemoryLimit at which MEMORY turns on
	// (default 0.85).
	MemoryRatio float64
	// MemorySource is what is compared with the limit: MemoryRSS (default
	// where /proc/self/statm exists) or MemoryGo.
	MemorySource string
	// PublishRate is the publishes per second made on this instance, all
	// topics together, at which PUBLISH_RATE turns on (default 50,000).
	PublishRate float64
	// MaxSubscriptions is the number of (connection, topic) subscriptions
	// on this instance at which SUBSCRIBERS turns on (default 1,000,000).
	MaxSubscriptions int
	// SubscriberRatio, when positive, also turns SUBSCRIBERS on when the
	// average connection has this many subscriptions (off by default: a
	// few dashboard connections with many topics would trip it on an idle
	// server).
	SubscriberRatio float64
	// Hysteresis is the band below a threshold a signal must fall under to
	// turn off (default 0.1: under 90% of the threshold). Negative: none.
	Hysteresis float64
	// ClearAfter is how many consecutive samples under that band turn a
	// signal off (default 3). A signal turns on at the first sample at or
	// over its threshold.
	ClearAfter int
	// TopN bounds Pressure.TopPublishers (default 20).
	TopN int
	// MaxTopics bounds the topics whose publishes are counted apart (default
	// 10,000); past it, publishes to further topics count in the total
	// rate only, until a sample drops topics that went quiet.
	MaxTopics int
}

// withDefaults resolves o's zero values.
func (o PressureOptions) withDefaults() PressureOptions {
	if o.SampleInterval == 0 {
		o.SampleInterval = DefaultPressureSampleInterval
	}
	if o.MemoryLimit == 0 {
		o.MemoryLimit = defaultMemoryLimit()
	}
	if o.MemoryRatio == 0 {
		o.MemoryRatio = DefaultPressureMemoryRatio
	}
	if o.MemorySource == "" {
		o.MemorySource = MemoryGo
		if _, err := readRSS(); err == nil {
			o.MemorySource = MemoryRSS
		}
	}
	if o.PublishRate == 0 {
		o.PublishRate = DefaultPressurePublishRate
	}
	if o.MaxSubscriptions == 0 {
		o.MaxSubscriptions = DefaultPressureMaxSubscriptions
	}
	if o.Hysteresis == 0 {
		o.Hysteresis = DefaultPressureHysteresis
	}
	if o.Hysteresis < 0 {
		o.Hysteresis = 0
	}
	if o.ClearAfter <= 0 {
		o.ClearAfter = DefaultPressureClearAfter
	}
	if o.TopN <= 0 {
		o.TopN = DefaultPressureTopN
	}
	if o.MaxTopics <= 0 {
		o.MaxTopics = DefaultPressureMaxTopics
	}
	return o
}

func (o PressureOptions) validate() error {
	switch {
	case o.MemorySource != MemoryRSS && o.MemorySource != MemoryGo:
		return fmt.Errorf("fabric: Pressure.MemorySource %q: want %q or %q", o.MemorySource, MemoryRSS, MemoryGo)
	case o.MemoryRatio < 0 || math.IsNaN(o.MemoryRatio):
		return fmt.Errorf("fabric: Pressure.MemoryRatio %v: want a positive fraction", o.MemoryRatio)
	case o.Hysteresis >= 1 || math.IsNaN(o.Hysteresis):
		return fmt.Errorf("fabric: Pressure.Hysteresis %v: want less than 1", o.Hysteresis)
	case o.SampleInterval > MaxPressureSampleInterval:
		return fmt.Errorf("fabric: Pressure.SampleInterval %s: at most %s", o.SampleInterval, MaxPressureSampleInterval)
	}
	return nil
}

// TopicRate is one topic's publish rate on an instance.
type TopicRate struct {
	Topic          string  `json:"topic"`
	MessagesPerSec float64 `json:"messagesPerSec"`
	BytesPerSec    float64 `json:"bytesPerSec"`
}

// Pressure is one sample of an instance's pressure signals.
type Pressure struct {
	// Reason is the first signal on, in precedence order (NONE: none).
	Reason PressureReason `json:"reason"`
	// Active reports Reason != NONE.
	Active bool `json:"active"`
	// Firing lists every signal on, in precedence order.
	Firing []PressureReason `json:"firing,omitempty"`
	// MemoryBytes is the memory sampled (PressureOptions.MemorySource).
	MemoryBytes int64 `json:"memoryBytes"`
	// MemoryLimit is the limit it is compared with (0: none).
	MemoryLimit int64 `json:"memoryLimit"`
	// PublishRate is the publishes per second made on this instance over
	// the last sample window.
	PublishRate float64 `json:"publishRate"`
	// PublishBytesRate is their envelope bytes per second.
	PublishBytesRate float64 `json:"publishBytesRate"`
	// Subscriptions is the number of (connection, topic) subscriptions.
	Subscriptions int `json:"subscriptions"`
	// Connections is the number of connections.
	Connections int `json:"connections"`
	// SubscriberRatio is Subscriptions per connection (0 with none).
	SubscriberRatio float64 `json:"subscriberRatio"`
	// TopPublishers are the topics published most on this instance over
	// the last window, by messages per second, highest first, at most
	// PressureOptions.TopN. The slice is shared: do not modify it.
	TopPublishers []TopicRate `json:"topPublishers"`
	// SampledAt is when the sample was taken (zero: never).
	SampledAt time.Time `json:"sampledAt"`
}

// Pressure returns the last sample of the node's pressure signals. It is
// a pointer load, cheap enough for every call of a hot path; the sample's
// slices are shared and must not be modified.
func (n *Node) Pressure() Pressure {
	if p := n.pressure.cur.Load(); p != nil {
		return *p
	}
	return Pressure{Reason: PressureNone}
}

// pressureState is the Node's part of this file.
type pressureState struct {
	opts     PressureOptions
	disabled bool
	pubs     pubTracker
	cur      atomic.Pointer[Pressure]
	stop     chan struct{}
	done     chan struct{}

	// Owned by the sampler.
	mem, rate, subs signal
	last            time.Time
	readMemory      func() (int64, error)
	memErrLogged    bool
}

// startPressure resolves the options, takes a first sample and starts the
// sampler; Node.Close stops it.
func (n *Node) startPressure() error {
	p := &n.pressure
	p.opts = n.cfg.Pressure.withDefaults()
	if err := p.opts.validate(); err != nil {
		return err
	}
	p.stop = make(chan struct{})
	p.done = make(chan struct{})
	if p.opts.SampleInterval < 0 {
		p.disabled = true
		close(p.done)
		return nil
	}
	p.pubs.init(p.opts.MaxTopics)
	p.readMemory = readGoMemory
	if p.opts.MemorySource == MemoryRSS {
		p.readMemory = readRSS
	}
	if reg := n.cfg.Registerer; reg != nil {
		if err := reg.Register(pressureCollector{n}); err != nil {
			return fmt.Errorf("fabric: registering the pressure metrics: %w", err)
		}
	}
	p.last = time.Now()
	n.samplePressure(p.last)
	go n.runPressure()
	return nil
}

// stopPressure stops the sampler and waits for it.
func (n *Node) stopPressure() {
	p := &n.pressure
	if p.stop == nil {
		return
	}
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
}

func (n *Node) runPressure() {
	p := &n.pressure
	defer close(p.done)
	t := time.NewTicker(p.opts.SampleInterval)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			n.samplePressure(now)
		}
	}
}

// countPublish records one publish of size bytes to topic; it is on the
// publish hot path.
func (p *pressureState) countPublish(topic string, size int) {
	if p.disabled {
		return
	}
	p.pubs.add(topic, size)
}

// samplePressure takes one sample at now and publishes it.
func (n *Node) samplePressure(now time.Time) {
	p := &n.pressure
	o := &p.opts
	s := &Pressure{SampledAt: now, Connections: n.Connections(), Subscriptions: int(n.hub.subs.Load())}
	if s.Connections > 0 {
		s.SubscriberRatio = float64(s.Subscriptions) / float64(s.Connections)
	}
	elapsed := now.Sub(p.last).Seconds()
	p.last = now
	counts, msgs, size := p.pubs.drain()
	if elapsed > 0 {
		s.PublishRate = float64(msgs) / elapsed
		s.PublishBytesRate = float64(size) / elapsed
		s.TopPublishers = topRates(counts, elapsed, o.TopN)
	}
	memOn := false
	if o.MemoryLimit > 0 {
		s.MemoryLimit = o.MemoryLimit
		m, err := p.readMemory()
		if err != nil {
			if !p.memErrLogged {
				p.memErrLogged = true
				n.log.Warn("pressure: reading memory failed; MEMORY stays as it was", "source", o.MemorySource, "err", err)
			}
			memOn = p.mem.on
		} else {
			s.MemoryBytes = m
			memOn = p.mem.update(float64(m), o.MemoryRatio*float64(o.MemoryLimit), o.Hysteresis, o.ClearAfter)
		}
	}
	rateOn := p.rate.update(s.PublishRate, o.PublishRate, o.Hysteresis, o.ClearAfter)
	// SUBSCRIBERS follows the larger of the two loads, each relative to
	// its threshold, so that one hysteresis state serves both.
	subLoad, subMax := 0.0, 1.0
	if o.MaxSubscriptions > 0 {
		subLoad = float64(s.Subscriptions) / float64(o.MaxSubscriptions)
	}
	if o.SubscriberRatio > 0 {
		subLoad = max(subLoad, s.SubscriberRatio/o.SubscriberRatio)
	}
	if o.MaxSubscriptions <= 0 && o.SubscriberRatio <= 0 {
		subMax = -1
	}
	subsOn := p.subs.update(subLoad, subMax, o.Hysteresis, o.ClearAfter)
	for _, f := range [...]struct {
		on bool
		r  PressureReason
	}{{memOn, PressureMemory}, {rateOn, PressurePublishRate}, {subsOn, PressureSubscribers}} {
		if f.on {
			s.Firing = append(s.Firing, f.r)
		}
	}
	s.Reason = PressureNone
	if len(s.Firing) > 0 {
		s.Reason, s.Active = s.Firing[0], true
	}
	if prev := p.cur.Load(); prev != nil && prev.Reason != s.Reason {
		n.log.Info("pressure changed", "from", prev.Reason, "to", s.Reason, "memory", s.MemoryBytes,
			"publish_rate", s.PublishRate, "subscriptions", s.Subscriptions)
	}
	p.cur.Store(s)
}

// signal is one pressure signal's on/off state with hysteresis.
type signal struct {
	on    bool
	below int // consecutive samples under the band while on
}

// update feeds one sample of v against threshold (≤ 0: the signal is off)
// and reports whether the signal is on: it turns on at threshold and off
// after clearAfter consecutive samples under threshold×(1-hysteresis).
func (s *signal) update(v, threshold, hysteresis float64, clearAfter int) bool {
	if threshold <= 0 {
		s.on, s.below = false, 0
		return false
	}
	switch {
	case !s.on:
		if v >= threshold {
			s.on, s.below = true, 0
		}
	case v < threshold*(1-hysteresis):
		s.below++
		if s.below >= clearAfter {
			s.on, s.below = false, 0
		}
	default:
		s.below = 0
	}
	return s.on
}

// topicCount is one topic's publishes over a sample window.
type topicCount struct {
	topic       string
	msgs, bytes uint64
}

// topRates returns the n topics with the most messages as rates.
func topRates(counts []topicCount, seconds float64, n int) []TopicRate {
	slices.SortFunc(counts, func(a, b topicCount) int {
		if a.msgs != b.msgs {
			if a.msgs > b.msgs {
				return -1
			}
			return 1
		}
		switch {
		case a.topic < b.topic:
			return -1
		case a.topic > b.topic:
			return 1
		}
		return 0
	})
	counts = counts[:min(n, len(counts))]
	out := make([]TopicRate, len(counts))
	for i, c := range counts {
		out[i] = TopicRate{Topic: c.topic, MessagesPerSec: float64(c.msgs) / seconds, BytesPerSec: float64(c.bytes) / seconds}
	}
	return out
}

// pubShards spreads the per-topic publish counters over independent maps.
const pubShards = 64

// pubTracker counts publishes per topic. Each shard has an immutable map of
// the topics published in the previous window, read without a lock, and a
// locked map of the topics first seen in this one; each sample merges them
// and drops the topics that went quiet, which bounds both by the topics
// published within one window (and by MaxTopics). A publish to a topic of
// the previous window costs a hash, a map lookup and two atomic adds.
type pubTracker struct {
	seed    maphash.Seed
	max     int64
	tracked atomic.Int64 // counters in every read and dirty map
	shards  [pubShards]pubShard
}

type pubShard struct {
	read  atomic.Pointer[map[string]*pubCounter]
	mu    sync.Mutex
	dirty map[string]*pubCounter // guarded by mu
	other pubCounter             // publishes past MaxTopics
	_     [24]byte               // one shard per 64-byte cache line
}

// pubCounter packs a topic's messages (high 28 bits) and bytes (low 36
// bits) of one window in one word, so that a publish is one atomic add:
// 268M messages and 64 GiB per topic per window (SampleInterval is at most
// 10s: 26M publishes/s to one topic, far past what one instance makes).
type pubCounter struct{ n atomic.Uint64 }

const (
	pubBytesBits = 36
	pubBytesMask = 1<<pubBytesBits - 1
)

func (c *pubCounter) add(size int) { c.n.Add(1<<pubBytesBits | uint64(size)&pubBytesMask) }

// take returns and resets the counts.
func (c *pubCounter) take() (msgs, size uint64) {
	v := c.n.Swap(0)
	return v >> pubBytesBits, v & pubBytesMask
}

func (t *pubTracker) init(maxTopics int) {
	t.seed = maphash.MakeSeed()
	t.max = int64(maxTopics)
	for i := range t.shards {
		t.shards[i].dirty = map[string]*pubCounter{}
	}
}

func (t *pubTracker) add(topic string, size int) {
	s := &t.shards[maphash.String(t.seed, topic)%pubShards]
	if m := s.read.Load(); m != nil {
		if c := (*m)[topic]; c != nil {
			c.add(size)
			return
		}
	}
	s.mu.Lock()
	// The read map is replaced under mu only: look again, so that a topic
	// a drain has just moved there is not added to dirty as well.
	c := s.dirty[topic]
	if m := s.read.Load(); c == nil && m != nil {
		c = (*m)[topic]
	}
	if c == nil {
		if t.tracked.Load() < t.max {
			c = &pubCounter{}
			s.dirty[topic] = c
			t.tracked.Add(1)
		} else {
			c = &s.other
		}
	}
	s.mu.Unlock()
	c.add(size)
}

// drain returns the counts since the last drain, by topic and in total,
// and resets them. A publish racing with the removal of its quiet topic
// may be lost; it is at most one per publisher.
func (t *pubTracker) drain() (counts []topicCount, msgs, size uint64) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		var next map[string]*pubCounter
		keep := func(topic string, c *pubCounter) {
			m, b := c.take()
			if m == 0 {
				t.tracked.Add(-1)
				return
			}
			if next == nil {
				next = map[string]*pubCounter{}
			}
			next[topic] = c
			counts = append(counts, topicCount{topic, m, b})
			msgs += m
			size += b
		}
		if old := s.read.Load(); old != nil {
			for topic, c := range *old {
				keep(topic, c)
			}
		}
		for topic, c := range s.dirty {
			keep(topic, c)
		}
		clear(s.dirty)
		if next == nil {
			s.read.Store(nil)
		} else {
			s.read.Store(&next)
		}
		m, b := s.other.take()
		msgs += m
		size += b
		s.mu.Unlock()
	}
	return counts, msgs, size
}

// defaultMemoryLimit is GOMEMLIMIT, else the cgroup's memory limit, else
// the physical memory, else 0 (unknown).
func defaultMemoryLimit() int64 {
	if l := debug.SetMemoryLimit(-1); l > 0 && l < math.MaxInt64 {
		return l
	}
	for _, f := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		v, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
		if err == nil && v > 0 && v < 1<<60 { // "max" or a page-rounded MaxInt64: no limit
			return v
		}
	}
	return memTotal()
}

// memTotal returns MemTotal from /proc/meminfo in bytes, or 0.
func memTotal() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := bytes.Fields(sc.Bytes())
		if len(fields) >= 2 && string(fields[0]) == "MemTotal:" {
			kb, err := strconv.ParseInt(string(fields[1]), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

var pageSize = int64(os.Getpagesize())

// readRSS returns the process's resident set size from /proc/self/statm.
func readRSS() (int64, error) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, fmt.Errorf("reading RSS: %w", err)
	}
	fields := bytes.Fields(b)
	if len(fields) < 2 {
		return 0, errors.New("reading RSS: /proc/self/statm has fewer than 2 fields")
	}
	pages, err := strconv.ParseInt(string(fields[1]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("reading RSS: %w", err)
	}
	return pages * pageSize, nil
}

// readGoMemory returns the memory the Go runtime holds from the OS: what
// GOMEMLIMIT counts.
func readGoMemory() (int64, error) {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	for _, x := range s {
		if x.Value.Kind() != metrics.KindUint64 {
			return 0, fmt.Errorf("reading Go memory: runtime metric %s unavailable", x.Name)
		}
	}
	return int64(s[0].Value.Uint64() - s[1].Value.Uint64()), nil
}

// pressureCollector exports the last pressure sample.
type pressureCollector struct{ n *Node }

var (
	pressureReasonDesc = prometheus.NewDesc("fabric_pressure",
		"1 for the instance's current pressure reason (NONE, MEMORY, PUBLISH_RATE, SUBSCRIBERS), 0 for the others.", []string{"reason"}, nil)
	pressureSignalDesc = prometheus.NewDesc("fabric_pressure_signal",
		"1 while a pressure signal is on, even when a signal of higher precedence decides the reason.", []string{"signal"}, nil)
	pressureMemoryDesc = prometheus.NewDesc("fabric_pressure_memory_bytes",
		"Memory compared with the pressure limit (RSS or the Go runtime's), at the last sample.", nil, nil)
	pressureLimitDesc = prometheus.NewDesc("fabric_pressure_memory_limit_bytes",
		"Memory limit of the MEMORY pressure signal (0: none).", nil, nil)
	pressureRateDesc = prometheus.NewDesc("fabric_pressure_publish_rate",
		"Publishes per second made on this instance over the last pressure sample window.", nil, nil)
)

var allReasons = [...]PressureReason{PressureNone, PressureMemory, PressurePublishRate, PressureSubscribers}

// Describe implements prometheus.Collector.
func (pc pressureCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{pressureReasonDesc, pressureSignalDesc, pressureMemoryDesc, pressureLimitDesc, pressureRateDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (pc pressureCollector) Collect(ch chan<- prometheus.Metric) {
	p := pc.n.Pressure()
	for _, r := range allReasons {
		v := 0.0
		if p.Reason == r {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(pressureReasonDesc, prometheus.GaugeValue, v, string(r))
		if r != PressureNone {
			ch <- prometheus.MustNewConstMetric(pressureSignalDesc, prometheus.GaugeValue, b2f(slices.Contains(p.Firing, r)), string(r))
		}
	}
	ch <- prometheus.MustNewConstMetric(pressureMemoryDesc, prometheus.GaugeValue, float64(p.MemoryBytes))
	ch <- prometheus.MustNewConstMetric(pressureLimitDesc, prometheus.GaugeValue, float64(p.MemoryLimit))
	ch <- prometheus.MustNewConstMetric(pressureRateDesc, prometheus.GaugeValue, p.PublishRate)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
