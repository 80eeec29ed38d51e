package admission

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"

	"github.com/fabricrt/fabric/fabric"
	"github.com/prometheus/client_golang/prometheus"
)

// Rejection reasons other than pressure reasons: the reason label of
// admission_rejected_total.
const (
	// ReasonPredicate is a Predicate's refusal.
	ReasonPredicate = "PREDICATE"
	// ReasonClusterTopPublisher is a ClusterTopPublisher rule's refusal.
	ReasonClusterTopPublisher = "CLUSTER_TOP_PUBLISHER"
	// ReasonError is a refusal because the rule could not decide (its
	// error is returned).
	ReasonError = "ERROR"
)

// Errors of ShouldAccept, wrapped with the class.
var (
	// ErrUnknownClass: no rule was configured for the class.
	ErrUnknownClass = errors.New("admission: unknown class")
	// ErrNoTopic: a ClusterTopPublisher rule was asked about a call with
	// no topic (see WithTopic).
	ErrNoTopic = errors.New("admission: no topic for a ClusterTopPublisher rule")
)

// Rule decides whether a class of work is accepted: Reasons, Predicate or
// ClusterTopPublisher.
type Rule interface{ isRule() }

// Reasons refuses the class while the node's pressure reason
// (fabric.Pressure.Reason) is one of them.
type Reasons []fabric.PressureReason

// Predicate is custom logic: it returns true to accept. An error refuses
// the work and is returned by ShouldAccept.
type Predicate func(ctx context.Context, class string, node *fabric.Node) (bool, error)

// ClusterTopPublisher refuses work on a topic whose cluster-wide publish
// rate (Rates.RateOf, messages per second summed over every instance) is at
// or over Threshold: the topic is among the cluster's top publishers and
// hot. The topic comes from the context (WithTopic; BeforeExecute sets the
// topic of a client publish).
type ClusterTopPublisher struct {
	// Rates is the cluster view, an *Aggregator.
	Rates RateSource
	// Threshold is the messages per second at which the topic is refused
	// (not negative).
	Threshold float64
}

// RateSource answers cluster-wide publish rates (Aggregator does).
type RateSource interface {
	// RateOf returns topic's cluster-wide messages per second, or 0 when
	// it is not among the cluster's top publishers.
	RateOf(topic string) float64
}

func (Reasons) isRule()             {}
func (Predicate) isRule()           {}
func (ClusterTopPublisher) isRule() {}

// Rules maps a class name to its rule.
type Rules map[string]Rule

// Control answers ShouldAccept for the classes of its Rules and counts
// every decision in admission_accepted_total{class} and
// admission_rejected_total{class,reason}. It is a prometheus.Collector.
type Control struct {
	classes   map[string]*class
	accepted  *prometheus.CounterVec
	rejected  *prometheus.CounterVec
	callTopic func(*fabric.Call) string
}

type class struct {
	name     string
	rule     Rule
	reasons  map[fabric.PressureReason]bool
	accepted prometheus.Counter
}

// Option configures New.
type Option func(*options)

type options struct {
	reg       prometheus.Registerer
	callTopic func(*fabric.Call) string
}

// WithRegisterer registers the Control's metrics with reg.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(o *options) { o.reg = reg }
}

// WithCallTopic sets how BeforeExecute finds the topic of an RPC call, for
// ClusterTopPublisher rules (default CallTopic).
func WithCallTopic(f func(*fabric.Call) string) Option {
	return func(o *options) { o.callTopic = f }
}

// New returns a Control for rules (at least one class).
func New(rules Rules, opts ...Option) (*Control, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if len(rules) == 0 {
		return nil, errors.New("admission: no classes")
	}
	c := &Control{
		classes: map[string]*class{},
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "admission_accepted_total", Help: "Work accepted by admission control, by class.",
		}, []string{"class"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "admission_rejected_total", Help: "Work refused by admission control (OVERLOADED), by class and reason.",
		}, []string{"class", "reason"}),
		callTopic: o.callTopic,
	}
	if c.callTopic == nil {
		c.callTopic = CallTopic
	}
	for name, r := range rules {
		cl := &class{name: name, rule: r, accepted: c.accepted.WithLabelValues(name)}
		switch r := r.(type) {
		case Reasons:
			cl.reasons = map[fabric.PressureReason]bool{}
			for _, reason := range r {
				switch reason {
				case fabric.PressureMemory, fabric.PressurePublishRate, fabric.PressureSubscribers:
				default:
					return nil, fmt.Errorf("admission: class %q: invalid reason %q (want MEMORY, PUBLISH_RATE or SUBSCRIBERS)", name, reason)
				}
				cl.reasons[reason] = true
			}
		case Predicate:
			if r == nil {
				return nil, fmt.Errorf("admission: class %q: nil predicate", name)
			}
		case ClusterTopPublisher:
			if r.Rates == nil {
				return nil, fmt.Errorf("admission: class %q: ClusterTopPublisher needs Rates (an *Aggregator)", name)
			}
			if r.Threshold < 0 || math.IsNaN(r.Threshold) || math.IsInf(r.Threshold, 0) {
				return nil, fmt.Errorf("admission: class %q: ClusterTopPublisher threshold %v: want a finite number ≥ 0", name, r.Threshold)
			}
		case nil:
			return nil, fmt.Errorf("admission: class %q: nil rule", name)
		default:
			return nil, fmt.Errorf("admission: class %q: unknown rule type %T", name, r)
		}
		c.classes[name] = cl
	}
	if o.reg != nil {
		if err := o.reg.Register(c); err != nil {
			return nil, fmt.Errorf("admission: registering metrics: %w", err)
		}
	}
	return c, nil
}

// Classes returns the configured class names, sorted.
func (c *Control) Classes() []string {
	out := make([]string, 0, len(c.classes))
	for name := range c.classes {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// ShouldAccept decides whether work of class is accepted now on node. An
// error (unknown class, a failed predicate, a ClusterTopPublisher rule with
// no topic in ctx) comes with false.
func (c *Control) ShouldAccept(ctx context.Context, class string, node *fabric.Node) (bool, error) {
	cl := c.classes[class]
	if cl == nil {
		return false, fmt.Errorf("%w %q", ErrUnknownClass, class)
	}
	reason, err := cl.decide(ctx, node)
	if err != nil {
		c.rejected.WithLabelValues(class, ReasonError).Inc()
		return false, fmt.Errorf("admission: class %q: %w", class, err)
	}
	if reason != "" {
		c.rejected.WithLabelValues(class, reason).Inc()
		return false, nil
	}
	cl.accepted.Inc()
	return true, nil
}

// decide returns the reason the rule refuses, or "".
func (cl *class) decide(ctx context.Context, node *fabric.Node) (string, error) {
	switch r := cl.rule.(type) {
	case Reasons:
		if node == nil {
			return "", errors.New("nil node")
		}
		if p := node.Pressure(); cl.reasons[p.Reason] {
			return string(p.Reason), nil
		}
	case Predicate:
		ok, err := r(ctx, cl.name, node)
		if err != nil {
			return "", err
		}
		if !ok {
			return ReasonPredicate, nil
		}
	case ClusterTopPublisher:
		topic, _ := TopicFrom(ctx)
		if topic == "" {
			return "", ErrNoTopic
		}
		if r.Rates.RateOf(topic) >= r.Threshold {
			return ReasonClusterTopPublisher, nil
		}
	}
	return "", nil
}

// Overloaded returns the client-visible refusal: OVERLOADED, "Server is
// shedding load" (svelte-realtime's LiveError shape).
func Overloaded() *fabric.LiveError {
	return fabric.NewLiveError(fabric.CodeOverloaded, "Server is shedding load")
}

// Classifier names the admission class of an RPC call ("" for calls that
// are not admission-controlled).
type Classifier func(call *fabric.Call) string

// BeforeExecute returns a fabric.Config.BeforeExecute that runs every call
// classOf names a class for through ShouldAccept: refused, the client gets
// OVERLOADED; a rule that cannot decide fails the call with its error
// (INTERNAL_ERROR to the client). Client publishes are the built-in
// fabric/publish RPC (fabric.PublishRPCPath), so they pass here too: their
// topic is put in the context for ClusterTopPublisher rules.
func (c *Control) BeforeExecute(classOf Classifier) func(ctx context.Context, call *fabric.Call) error {
	return func(ctx context.Context, call *fabric.Call) error {
		name := classOf(call)
		if name == "" {
			return nil
		}
		if t := c.callTopic(call); t != "" {
			ctx = WithTopic(ctx, t)
		}
		var node *fabric.Node
		if call.Client != nil {
			node = call.Client.Node()
		}
		ok, err := c.ShouldAccept(ctx, name, node)
		if err != nil {
			return err
		}
		if !ok {
			return Overloaded()
		}
		return nil
	}
}

// CallTopic returns the topic of a client publish (the first argument of a
// fabric/publish call), or "" for any other call.
func CallTopic(call *fabric.Call) string {
	if call.Path != fabric.PublishRPCPath || len(call.Args) == 0 {
		return ""
	}
	var t string
	if json.Unmarshal(call.Args[0], &t) != nil {
		return ""
	}
	return t
}

type topicKey struct{}

// WithTopic returns ctx carrying the topic the work is about, for
// ClusterTopPublisher rules.
func WithTopic(ctx context.Context, topic string) context.Context {
	return context.WithValue(ctx, topicKey{}, topic)
}

// TopicFrom returns the topic WithTopic put in ctx.
func TopicFrom(ctx context.Context) (string, bool) {
	t, ok := ctx.Value(topicKey{}).(string)
	return t, ok
}

// Describe implements prometheus.Collector.
func (c *Control) Describe(ch chan<- *prometheus.Desc) {
	c.accepted.Describe(ch)
	c.rejected.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Control) Collect(ch chan<- prometheus.Metric) {
	c.accepted.Collect(ch)
	c.rejected.Collect(ch)
}

// ClassConfig is one admission class as a config file states it: which
// work belongs to it (RPC path globs; topic globs, for client publishes)
// and its rule (RejectOn reasons, or a ClusterTopPublisher threshold).
type ClassConfig struct {
	// Name is the class (the class label of the metrics).
	Name string
	// RejectOn are pressure reasons that refuse the class (a Reasons rule).
	RejectOn []string
	// ClusterTopPublisher, when positive, makes the rule a
	// ClusterTopPublisher with this threshold (messages/s) instead; the
	// class may then only hold client publishes (Topics).
	ClusterTopPublisher float64
	// RPC are globs of RPC paths in the class ("reports/*"); '*' is any run.
	RPC []string
	// Topics are globs of topics whose client publishes are in the class.
	Topics []string
}

// Configure builds the Rules and the Classifier of classes, in order: a call
// belongs to the first class that matches it (for a client publish, its
// topic against Topics first, then "fabric/publish" against RPC). rates is
// needed by ClusterTopPublisher classes only.
func Configure(classes []ClassConfig, rates RateSource) (Rules, Classifier, error) {
	rules := Rules{}
	type matcher struct {
		name          string
		rpc, topics   func(string) bool
		rpcN, topicsN int
	}
	var ms []matcher
	for i, cc := range classes {
		if cc.Name == "" {
			return nil, nil, fmt.Errorf("admission: class %d has no name", i+1)
		}
		if _, dup := rules[cc.Name]; dup {
			return nil, nil, fmt.Errorf("admission: class %q is defined twice", cc.Name)
		}
		switch {
		case cc.ClusterTopPublisher > 0 && len(cc.RejectOn) > 0:
			return nil, nil, fmt.Errorf("admission: class %q: reject_on and cluster_top_publisher are two rules; a class has one", cc.Name)
		case cc.ClusterTopPublisher > 0:
			if rates == nil {
				return nil, nil, fmt.Errorf("admission: class %q: cluster_top_publisher needs the publish-rate aggregator", cc.Name)
			}
			for _, p := range cc.RPC {
				if p != fabric.PublishRPCPath {
					return nil, nil, fmt.Errorf("admission: class %q: cluster_top_publisher classes hold client publishes only (topics), not RPC %q", cc.Name, p)
				}
			}
			rules[cc.Name] = ClusterTopPublisher{Rates: rates, Threshold: cc.ClusterTopPublisher}
		case len(cc.RejectOn) > 0:
			rs := make(Reasons, 0, len(cc.RejectOn))
			for _, r := range cc.RejectOn {
				rs = append(rs, fabric.PressureReason(strings.ToUpper(strings.TrimSpace(r))))
			}
			rules[cc.Name] = rs
		default:
			return nil, nil, fmt.Errorf("admission: class %q has no rule (reject_on or cluster_top_publisher)", cc.Name)
		}
		ms = append(ms, matcher{cc.Name, fabric.MatchTopics(cc.RPC), fabric.MatchTopics(cc.Topics), len(cc.RPC), len(cc.Topics)})
	}
	classify := func(call *fabric.Call) string {
		if call.Path == fabric.PublishRPCPath {
			if t := CallTopic(call); t != "" {
				for _, m := range ms {
					if m.topicsN > 0 && m.topics(t) {
						return m.name
					}
				}
			}
		}
		for _, m := range ms {
			if m.rpcN > 0 && m.rpc(call.Path) {
				return m.name
			}
		}
		return ""
	}
	return rules, classify, nil
}
