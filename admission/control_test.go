package admission_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/prometheus/client_golang/prometheus"
)

// rates is a fixed RateSource.
type rates map[string]float64

func (r rates) RateOf(topic string) float64 { return r[topic] }

// TestRuleShapes: each rule shape accepts and rejects as specified, and the
// metrics count every decision by class and reason.
func TestRuleShapes(t *testing.T) {
	// A node under MEMORY from its first sample (a 1-byte limit), one under
	// nothing, one under SUBSCRIBERS once sampled.
	mem, _ := memCluster(t, 1, fabric.Config{Pressure: fabric.PressureOptions{MemoryLimit: 1}})
	idle, _ := memCluster(t, 1, fabric.Config{Pressure: fabric.PressureOptions{MemoryLimit: -1}})
	subs, _ := memCluster(t, 1, fabric.Config{Pressure: fabric.PressureOptions{MemoryLimit: -1, MaxSubscriptions: 1, SampleInterval: 10 * time.Millisecond}})
	c := subs[0].Connect(nopTransport{}, nil, "t")
	if err := subs[0].Subscribe(c, "room"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "SUBSCRIBERS", func() bool { return subs[0].Pressure().Reason == fabric.PressureSubscribers })
	if r := mem[0].Pressure().Reason; r != fabric.PressureMemory {
		t.Fatalf("node with a 1-byte limit: %s", r)
	}

	errPredicate := errors.New("directory down")
	reg := prometheus.NewRegistry()
	ctl, err := admission.New(admission.Rules{
		"memory-only": admission.Reasons{fabric.PressureMemory},
		"rate-only":   admission.Reasons{fabric.PressurePublishRate},
		"any":         admission.Reasons{fabric.PressureMemory, fabric.PressurePublishRate, fabric.PressureSubscribers},
		"small": admission.Predicate(func(_ context.Context, class string, n *fabric.Node) (bool, error) {
			return n.Connections() < 1, nil
		}),
		"broken": admission.Predicate(func(context.Context, string, *fabric.Node) (bool, error) { return false, errPredicate }),
		"hot":    admission.ClusterTopPublisher{Rates: rates{"chat:busy": 1500, "chat:calm": 10}, Threshold: 1000},
	}, admission.WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		class  string
		ctx    context.Context
		node   *fabric.Node
		accept bool
		err    error
	}{
		{"memory-only", ctx, mem[0], false, nil},
		{"memory-only", ctx, idle[0], true, nil},
		{"memory-only", ctx, subs[0], true, nil},
		{"rate-only", ctx, mem[0], true, nil}, // the reason is MEMORY, not PUBLISH_RATE
		{"any", ctx, subs[0], false, nil},
		{"any", ctx, idle[0], true, nil},
		{"small", ctx, idle[0], true, nil},
		{"small", ctx, subs[0], false, nil},
		{"broken", ctx, idle[0], false, errPredicate},
		{"hot", admission.WithTopic(ctx, "chat:busy"), idle[0], false, nil},
		{"hot", admission.WithTopic(ctx, "chat:calm"), idle[0], true, nil},
		{"hot", admission.WithTopic(ctx, "chat:unknown"), idle[0], true, nil},
		{"hot", ctx, idle[0], false, admission.ErrNoTopic},
		{"nope", ctx, idle[0], false, admission.ErrUnknownClass},
	} {
		ok, err := ctl.ShouldAccept(tc.ctx, tc.class, tc.node)
		if ok != tc.accept || !errors.Is(err, tc.err) {
			t.Errorf("%s on a node under %s: %v, %v; want %v, %v", tc.class, tc.node.Pressure().Reason, ok, err, tc.accept, tc.err)
		}
	}
	for _, m := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"admission_accepted_total", []string{"memory-only"}, 2},
		{"admission_rejected_total", []string{"memory-only", "MEMORY"}, 1},
		{"admission_accepted_total", []string{"rate-only"}, 1},
		{"admission_rejected_total", []string{"any", "SUBSCRIBERS"}, 1},
		{"admission_accepted_total", []string{"any"}, 1},
		{"admission_accepted_total", []string{"small"}, 1},
		{"admission_rejected_total", []string{"small", admission.ReasonPredicate}, 1},
		{"admission_rejected_total", []string{"broken", admission.ReasonError}, 1},
		{"admission_rejected_total", []string{"hot", admission.ReasonClusterTopPublisher}, 1},
		{"admission_accepted_total", []string{"hot"}, 2},
		{"admission_rejected_total", []string{"hot", admission.ReasonError}, 1},
	} {
		if got := metric(t, reg, m.name, m.labels...); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
}

func TestNewRejectsBadRules(t *testing.T) {
	for name, rules := range map[string]admission.Rules{
		"empty":         {},
		"bad reason":    {"a": admission.Reasons{"CPU"}},
		"NONE":          {"a": admission.Reasons{fabric.PressureNone}},
		"nil predicate": {"a": admission.Predicate(nil)},
		"no rates":      {"a": admission.ClusterTopPublisher{Threshold: 1}},
		"negative":      {"a": admission.ClusterTopPublisher{Rates: rates{}, Threshold: -1}},
		"nil rule":      {"a": nil},
	} {
		if _, err := admission.New(rules); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestOverloadedOverTheWire: BeforeExecute refuses an RPC class and client
// publishes with OVERLOADED ("Server is shedding load"), over WebSocket and
// over SSE (the session layer is shared); other calls go through.
func TestOverloadedOverTheWire(t *testing.T) {
	var ctl *admission.Control
	var classify admission.Classifier
	reg := prometheus.NewRegistry()
	nodes, _ := memCluster(t, 1, fabric.Config{
		Pressure: fabric.PressureOptions{MemoryLimit: 1}, // MEMORY throughout
		Hooks:    fabric.Hooks{Publish: func(*fabric.Client, string, string) error { return nil }},
		BeforeExecute: func(ctx context.Context, call *fabric.Call) error {
			return ctl.BeforeExecute(classify)(ctx, call)
		},
	})
	node := nodes[0]
	rules, cls, err := admission.Configure([]admission.ClassConfig{
		{Name: "reports", RejectOn: []string{"memory"}, RPC: []string{"reports/*"}},
		{Name: "hot-chat", ClusterTopPublisher: 100, Topics: []string{"chat:*"}},
	}, rates{"chat:busy": 500})
	if err != nil {
		t.Fatal(err)
	}
	classify = cls
	if ctl, err = admission.New(rules, admission.WithRegisterer(reg)); err != nil {
		t.Fatal(err)
	}
	node.HandleRPC("reports/build", func(context.Context, *fabric.Call) (any, error) { return "built", nil })
	node.HandleRPC("chat/ping", func(context.Context, *fabric.Call) (any, error) { return "pong", nil })
	base := serve(t, node)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, url := range []string{wsURL(base), base + "/events"} {
		c := dial(t, url)
		var re *wsclient.RPCError
		if _, err := c.Call(ctx, "reports/build"); !errors.As(err, &re) || re.Code != fabric.CodeOverloaded || re.Message != "Server is shedding load" {
			t.Fatalf("%s: reports/build under MEMORY: %v", url, err)
		}
		if res, err := c.Call(ctx, "chat/ping"); err != nil || string(res) != `"pong"` {
			t.Fatalf("%s: an unclassified call: %s, %v", url, res, err)
		}
		if _, err := c.Call(ctx, fabric.PublishRPCPath, "chat:busy", "msg", 1); !errors.As(err, &re) || re.Code != fabric.CodeOverloaded {
			t.Fatalf("%s: publish to a top publisher: %v", url, err)
		}
		if res, err := c.Call(ctx, fabric.PublishRPCPath, "chat:calm", "msg", 1); err != nil || !strings.Contains(string(res), "seq") {
			t.Fatalf("%s: publish to a calm topic: %s, %v", url, res, err)
		}
	}
	if v := metric(t, reg, "admission_rejected_total", "reports", "MEMORY"); v != 2 {
		t.Fatalf("admission_rejected_total{reports,MEMORY} = %v", v)
	}
	if v := metric(t, reg, "admission_rejected_total", "hot-chat", admission.ReasonClusterTopPublisher); v != 2 {
		t.Fatalf("admission_rejected_total{hot-chat,CLUSTER_TOP_PUBLISHER} = %v", v)
	}
	if v := metric(t, reg, "admission_accepted_total", "hot-chat"); v != 2 {
		t.Fatalf("admission_accepted_total{hot-chat} = %v", v)
	}
}

func TestConfigureErrors(t *testing.T) {
	for name, classes := range map[string][]admission.ClassConfig{
		"no name":     {{RejectOn: []string{"MEMORY"}}},
		"twice":       {{Name: "a", RejectOn: []string{"MEMORY"}}, {Name: "a", RejectOn: []string{"MEMORY"}}},
		"no rule":     {{Name: "a", RPC: []string{"x/*"}}},
		"two rules":   {{Name: "a", RejectOn: []string{"MEMORY"}, ClusterTopPublisher: 5}},
		"rpc for top": {{Name: "a", ClusterTopPublisher: 5, RPC: []string{"x/y"}}},
	} {
		if _, _, err := admission.Configure(classes, rates{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := admission.Configure([]admission.ClassConfig{{Name: "a", ClusterTopPublisher: 5, Topics: []string{"x"}}}, nil); err == nil {
		t.Error("cluster_top_publisher without an aggregator accepted")
	}
}

// TestInFlight: the concurrency predicate refuses past its limit while the
// wrapped handlers run.
func TestInFlight(t *testing.T) {
	var f admission.InFlight
	release := make(chan struct{})
	started := make(chan struct{}, 3)
	h := f.Wrap(func(context.Context, *fabric.Call) (any, error) {
		started <- struct{}{}
		<-release
		return nil, nil
	})
	below := f.Below(2)
	done := make(chan struct{})
	for range 2 {
		go func() { _, _ = h(context.Background(), &fabric.Call{}); done <- struct{}{} }()
	}
	<-started
	<-started
	if ok, _ := below(context.Background(), "c", nil); ok || f.Count() != 2 {
		t.Fatalf("2 running, limit 2: accepted=%v count=%d", ok, f.Count())
	}
	close(release)
	<-done
	<-done
	if ok, _ := below(context.Background(), "c", nil); !ok || f.Count() != 0 {
		t.Fatalf("none running: accepted=%v count=%d", ok, f.Count())
	}
}

type nopTransport struct{}

func (nopTransport) Deliver(*fabric.Message) bool { return true }
func (nopTransport) Close(int, string)            {}

// TestReasonsFollowLoad: with the sampler running, a class refused on
// PUBLISH_RATE is refused while a publisher runs over the threshold and
// accepted again once it stops.
func TestReasonsFollowLoad(t *testing.T) {
	nodes, _ := memCluster(t, 1, fabric.Config{Pressure: fabric.PressureOptions{
		SampleInterval: 50 * time.Millisecond, PublishRate: 1000, MemoryLimit: -1,
	}})
	ctl, err := admission.New(admission.Rules{"bulk": admission.Reasons{fabric.PressurePublishRate}})
	if err != nil {
		t.Fatal(err)
	}
	accepted := func() bool {
		ok, err := ctl.ShouldAccept(context.Background(), "bulk", nodes[0])
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !accepted() {
		t.Fatal("refused on an idle node")
	}
	p := publishAt(t, nodes[0], "firehose", 3000)
	on := waitFor(t, 10*time.Second, "PUBLISH_RATE", func() bool { return !accepted() })
	p.stop()
	off := waitFor(t, 10*time.Second, "the rate to clear", accepted)
	t.Logf("refused %s after the publisher started, accepted %s after it stopped (3 samples of 50ms under the band)", on.Round(time.Millisecond), off.Round(time.Millisecond))
	if off < 100*time.Millisecond {
		t.Fatalf("cleared after %s: the hysteresis wants 3 samples under the band", off)
	}
}
