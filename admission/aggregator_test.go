package admission_test

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/prometheus/client_golang/prometheus"
)

// Intervals of the cluster tests, short to keep them fast.
const (
	sampleEvery  = 50 * time.Millisecond
	publishEvery = 300 * time.Millisecond
	staleAfter   = 900 * time.Millisecond
	// slack is what a loaded test machine may add to a deadline.
	slack = time.Second // scheduling on a loaded 2-core machine
)

func pressureConfig() fabric.Config {
	return fabric.Config{Pressure: fabric.PressureOptions{SampleInterval: sampleEvery, MemoryLimit: -1}}
}

// activate starts one aggregator per node (metrics on regs[i] when given).
func activate(t *testing.T, nodes []*fabric.Node, regs []*prometheus.Registry, subjects bool) []*admission.Aggregator {
	t.Helper()
	aggs := make([]*admission.Aggregator, len(nodes))
	for i, n := range nodes {
		o := admission.AggregatorOptions{PublishInterval: publishEvery, StaleAfter: staleAfter, InstanceID: fmt.Sprintf("inst-%d", i)}
		if regs != nil {
			o.Registerer = regs[i]
		}
		if subjects {
			bus := admission.NewBus(n, nil)
			o.Subjects = bus.LocalSubjects
		}
		a, err := admission.NewAggregator(o)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Activate(n); err != nil {
			t.Fatal(err)
		}
		if err := a.Activate(n); err != nil { // idempotent
			t.Fatal(err)
		}
		t.Cleanup(a.Deactivate)
		aggs[i] = a
	}
	return aggs
}

func find(top []admission.ClusterTopicRate, topic string) (admission.ClusterTopicRate, bool) {
	for _, r := range top {
		if r.Topic == topic {
			return r, true
		}
	}
	return admission.ClusterTopicRate{}, false
}

// clusterScenario is the three-instance test, on any backend: a topic
// published at 2,000 msg/s on instance 0 shows in every instance's
// TopPublishers within one publish interval of instance 0 seeing it; an
// instance whose broadcasts stop (stop ends instance i's broadcasts, or the
// instance) drops out after staleAfter.
func clusterScenario(t *testing.T, nodes []*fabric.Node, regs []*prometheus.Registry, stop func(i int, aggs []*admission.Aggregator)) {
	aggs := activate(t, nodes, regs, false)
	publishAt(t, nodes[0], "hot", 2000)
	waitFor(t, 10*time.Second, "instance 0's own sample to show hot", func() bool {
		_, ok := find(aggs[0].TopPublishers(), "hot")
		return ok
	})
	took := waitFor(t, 10*time.Second, "every instance to show hot", func() bool {
		for _, a := range aggs {
			if _, ok := find(a.TopPublishers(), "hot"); !ok {
				return false
			}
		}
		return true
	})
	t.Logf("hot reached every instance %s after instance 0 saw it (publish interval %s)", took.Round(time.Millisecond), publishEvery)
	if took > publishEvery+slack {
		t.Fatalf("hot took %s to reach every instance; publish interval %s", took, publishEvery)
	}
	for i, a := range aggs {
		r, _ := find(a.TopPublishers(), "hot")
		if r.ContributingInstances != 1 || r.MessagesPerSec < 500 || r.MessagesPerSec > 8000 {
			t.Errorf("instance %d: %+v", i, r)
		}
		if got := a.RateOf("hot"); got != r.MessagesPerSec {
			t.Errorf("instance %d: RateOf %v, TopPublishers %v", i, got, r.MessagesPerSec)
		}
	}

	// Instance 2 publishes too; then its broadcasts stop.
	publishAt(t, nodes[2], "from-2", 300)
	waitFor(t, 10*time.Second, "from-2 on instance 0", func() bool {
		_, ok := find(aggs[0].TopPublishers(), "from-2")
		return ok
	})
	if regs != nil {
		waitFor(t, 5*time.Second, "instance 0 to count 2 siblings", func() bool {
			return metric(t, regs[0], "cluster_publish_rate_instance_count") == 2
		})
	}
	stop(2, aggs)
	gone := waitFor(t, 10*time.Second, "from-2 to drop out of instance 0's view", func() bool {
		_, ok := find(aggs[0].TopPublishers(), "from-2")
		return !ok
	})
	t.Logf("a stopped instance dropped out after %s (staleAfter %s)", gone.Round(time.Millisecond), staleAfter)
	// Its last slice is at most one publish interval old when it stops.
	if gone < staleAfter-publishEvery-50*time.Millisecond || gone > staleAfter+slack {
		t.Fatalf("dropped out %s after stopping; staleAfter %s", gone, staleAfter)
	}
	if n := aggs[0].Instances(); n != 1 {
		t.Fatalf("instance 0 counts %d siblings after one stopped", n)
	}
	if regs != nil {
		if v := metric(t, regs[0], "cluster_publish_rate_instance_count"); v != 1 {
			t.Fatalf("cluster_publish_rate_instance_count = %v", v)
		}
		if v := metric(t, regs[1], "cluster_publish_rate_received_total"); v < 2 {
			t.Fatalf("cluster_publish_rate_received_total = %v", v)
		}
		if v := metric(t, regs[0], "cluster_publish_rate_broadcasts_total"); v < 1 {
			t.Fatalf("cluster_publish_rate_broadcasts_total = %v", v)
		}
	}
}

// TestAggregatorMemoryCluster: the three-instance scenario on the memory
// backend (three Nodes sharing one memory.Backend); instance 2 keeps
// publishing after its aggregator stops, so only staleness can take its
// slice out.
func TestAggregatorMemoryCluster(t *testing.T) {
	nodes, regs := memCluster(t, 3, pressureConfig())
	clusterScenario(t, nodes, regs, func(i int, aggs []*admission.Aggregator) { aggs[i].Deactivate() })
}

// TestAggregatorNATSCluster: the same on three embedded NATS servers in a
// cluster; the stopped instance is killed.
func TestAggregatorNATSCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("three embedded NATS servers")
	}
	insts := fabrictest.Cluster(t, 3, fabrictest.Options{Node: pressureConfig()})
	nodes := make([]*fabric.Node, len(insts))
	for i, in := range insts {
		nodes[i] = in.Node
	}
	clusterScenario(t, nodes, nil, func(i int, _ []*admission.Aggregator) { insts[i].Kill() })
}

// TestAggregatorEnvelopes: an envelope without subs is merged, one with
// subs adds subscriber counts, malformed ones are counted and dropped, and
// a bad entry does not spoil its envelope.
func TestAggregatorEnvelopes(t *testing.T) {
	nodes, regs := memCluster(t, 1, pressureConfig())
	aggs := activate(t, nodes, regs, false)
	a, br := aggs[0], nodes[0].Broker()
	send := func(env string) {
		t.Helper()
		if err := br.Publish(context.Background(), admission.DefaultChannel, []byte(env)); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UnixMilli()
	send(fmt.Sprintf(`{"instanceId":"old","ts":%d,"slice":[{"topic":"a","messagesPerSec":100,"bytesPerSec":5000}]}`, now))
	send(fmt.Sprintf(`{"instanceId":"new","ts":%d,"slice":[{"topic":"a","messagesPerSec":50,"bytesPerSec":10},{"topic":7},{"topic":"b","messagesPerSec":"x"}],"subs":[{"topic":"a","count":3},{"topic":"a","count":2},{"nope":1}]}`, now))
	for _, bad := range []string{
		`{"instanceId":"x","slice":`, // truncated
		`[1,2]`,
		`{"instanceId":5,"slice":[]}`,
		`{"instanceId":"","slice":[]}`,
		`{"instanceId":"x","slice":{"topic":"a"}}`,
		`{"instanceId":"x"}`,
		`null`,
	} {
		send(bad)
	}
	if s := a.Stats(); s.Received != 2 || s.ParseErrors != 7 {
		t.Fatalf("stats %+v, want 2 received and 7 parse errors", s)
	}
	if v := metric(t, regs[0], "cluster_publish_rate_parse_errors_total"); v != 7 {
		t.Fatalf("cluster_publish_rate_parse_errors_total = %v", v)
	}
	top := a.TopPublishers()
	if r, _ := find(top, "a"); r.MessagesPerSec != 150 || r.BytesPerSec != 5010 || r.ContributingInstances != 2 {
		t.Fatalf("a: %+v", r)
	}
	if r, _ := find(top, "b"); r.MessagesPerSec != 0 || r.ContributingInstances != 1 {
		t.Fatalf("b (a bad number is 0): %+v", r)
	}
	if got := a.SubscribersOf("a"); got != 5 {
		t.Fatalf("SubscribersOf(a) = %d, want 5 (only the envelope with subs counts)", got)
	}
	if got := a.Instances(); got != 2 {
		t.Fatalf("%d instances", got)
	}
	// An envelope from "new" without subs replaces its counts with none.
	send(`{"instanceId":"new","ts":1,"slice":[]}`)
	if got := a.SubscribersOf("a"); got != 0 {
		t.Fatalf("SubscribersOf(a) after an envelope without subs = %d", got)
	}
	// Our own broadcasts are not counted as siblings.
	send(fmt.Sprintf(`{"instanceId":%q,"ts":1,"slice":[{"topic":"self","messagesPerSec":1}]}`, a.InstanceID()))
	if _, ok := find(a.TopPublishers(), "self"); ok || a.Instances() != 2 {
		t.Fatal("an echo of our own envelope was merged")
	}
	a.Deactivate()
	if len(a.TopPublishers()) != 0 || a.Instances() != 0 {
		t.Fatal("Deactivate kept slices")
	}
	send(fmt.Sprintf(`{"instanceId":"late","ts":%d,"slice":[]}`, now))
	if a.Instances() != 0 {
		t.Fatal("an inactive aggregator took an envelope")
	}
	if err := a.Activate(nodes[0]); err != nil {
		t.Fatal(err)
	}
	send(fmt.Sprintf(`{"instanceId":"late","ts":%d,"slice":[]}`, now))
	if a.Instances() != 1 {
		t.Fatal("a reactivated aggregator did not take an envelope")
	}
}

// TestAggregatorTopNAndInstancesBounded: slices are cut at TopN and the
// instances tracked at MaxInstances.
func TestAggregatorTopNAndInstancesBounded(t *testing.T) {
	nodes, _ := memCluster(t, 1, pressureConfig())
	a, err := admission.NewAggregator(admission.AggregatorOptions{TopN: 3, MaxInstances: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(nodes[0]); err != nil {
		t.Fatal(err)
	}
	defer a.Deactivate()
	for i := range 4 {
		env := fmt.Sprintf(`{"instanceId":"i%d","ts":1,"slice":[{"topic":"t1","messagesPerSec":9},{"topic":"t2","messagesPerSec":8},{"topic":"t3","messagesPerSec":7},{"topic":"t4","messagesPerSec":6}]}`, i)
		_ = nodes[0].Broker().Publish(context.Background(), admission.DefaultChannel, []byte(env))
	}
	top := a.TopPublishers()
	if a.Instances() != 2 || len(top) != 3 || top[0].Topic != "t1" || top[0].MessagesPerSec != 18 {
		t.Fatalf("%d instances, top %+v", a.Instances(), top)
	}
}

// TestClusterSubscriberCounts: with Subjects wired to the bus, every
// instance's Bus.Subscribers is the cluster-wide count (eventually, within
// a publish interval); without an aggregator it is the local count.
func TestClusterSubscriberCounts(t *testing.T) {
	nodes, _ := memCluster(t, 3, pressureConfig())
	for i, n := range nodes {
		for range i + 1 { // 1, 2 and 3 subscribers of room:1
			if err := n.Subscribe(n.Connect(nopTransport{}, nil, "t"), "room:1"); err != nil {
				t.Fatal(err)
			}
		}
	}
	local := admission.NewBus(nodes[1], nil)
	if got := local.Subscribers("room:1"); got != 2 {
		t.Fatalf("local count %d", got)
	}
	if subj := local.LocalSubjects(); len(subj) != 1 || subj[0] != (admission.SubjectCount{Topic: "room:1", Count: 2}) {
		t.Fatalf("LocalSubjects %+v", subj)
	}
	aggs := activate(t, nodes, nil, true)
	buses := make([]*admission.Bus, len(nodes))
	for i := range nodes {
		buses[i] = admission.NewBus(nodes[i], aggs[i])
	}
	waitFor(t, 10*time.Second, "cluster-wide counts on every instance", func() bool {
		for _, b := range buses {
			if b.Subscribers("room:1") != 6 {
				return false
			}
		}
		return true
	})
	if got := buses[0].Subscribers("room:2"); got != 0 {
		t.Fatalf("an unknown topic counts %d", got)
	}
}

// TestAggregatorBreaker: broadcasts through a broker that fails open the
// breaker, after which they are refused without reaching the broker.
func TestAggregatorBreaker(t *testing.T) {
	nodes, _ := memCluster(t, 1, pressureConfig())
	reg := prometheus.NewRegistry()
	b, err := breaker.New(breaker.Options{Name: "pressure-rates", FailureThreshold: 3, ResetTimeout: time.Hour, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	a, err := admission.NewAggregator(admission.AggregatorOptions{PublishInterval: 10 * time.Millisecond, StaleAfter: 20 * time.Millisecond, Breaker: b})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(nodes[0]); err != nil {
		t.Fatal(err)
	}
	defer a.Deactivate()
	waitFor(t, 10*time.Second, "a broadcast", func() bool { return a.Stats().Broadcasts > 0 })
	_ = nodes[0].Broker().Close() // every publish fails from now on
	waitFor(t, 10*time.Second, "the breaker to open", func() bool { return b.State() == breaker.Open })
	waitFor(t, 10*time.Second, "refused broadcasts", func() bool { return metric(t, reg, "fabric_breaker_rejected_total") >= 3 })
	if v := metric(t, reg, "fabric_breaker_trips_total"); v != 1 {
		t.Fatalf("fabric_breaker_trips_total = %v", v)
	}
}

// TestRateMetrics: both wirers at once, on one registry.
func TestRateMetrics(t *testing.T) {
	nodes, regs := memCluster(t, 2, pressureConfig())
	aggs := activate(t, nodes, nil, false)
	if err := admission.WirePublishRateMetrics(nodes[0], regs[0], admission.RateMetricsOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admission.WireClusterPublishRateMetrics(aggs[0], regs[0], admission.RateMetricsOptions{TopN: 5}); err != nil {
		t.Fatal(err)
	}
	publishAt(t, nodes[0], "local", 500)
	publishAt(t, nodes[1], "remote", 500)
	waitFor(t, 10*time.Second, "both topics in the cluster metrics", func() bool {
		return metric(t, regs[0], "cluster_topic_publish_rate", "remote") > 0 && metric(t, regs[0], "cluster_topic_publish_rate", "local") > 0
	})
	if v := metric(t, regs[0], "fabric_topic_publish_rate", "remote"); v != 0 {
		t.Fatalf("the local view shows another instance's topic: %v", v)
	}
	if v := metric(t, regs[0], "fabric_topic_publish_rate", "local"); math.Abs(v-500) > 250 {
		t.Fatalf("fabric_topic_publish_rate{local} = %v", v)
	}
	if v := metric(t, regs[0], "cluster_topic_publish_bytes", "remote"); v <= 0 {
		t.Fatalf("cluster_topic_publish_bytes{remote} = %v", v)
	}
	// MapTopic folds topics into one label value.
	reg := prometheus.NewRegistry()
	if err := admission.WireClusterPublishRateMetrics(aggs[0], reg, admission.RateMetricsOptions{MapTopic: func(string) string { return "all" }}); err != nil {
		t.Fatal(err)
	}
	if v := metric(t, reg, "cluster_topic_publish_rate", "all"); v < metric(t, regs[0], "cluster_topic_publish_rate", "remote") {
		t.Fatalf("mapped sum %v", v)
	}
}

func TestAggregatorOptionsInvalid(t *testing.T) {
	for _, o := range []admission.AggregatorOptions{
		{PublishInterval: time.Second, StaleAfter: 500 * time.Millisecond},
		{TopN: -1},
		{Channel: "bad\"channel"},
	} {
		if _, err := admission.NewAggregator(o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}
