package pgbridge_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/pgbridge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// env is a deployment for one test: a standalone NATS server (so that
// killing an instance never takes the lease bucket or the history with
// it) and instances on it sharing one subject prefix.
type env struct {
	t       testing.TB
	natsURL string
	prefix  string
	persist []string // topic patterns kept in history
}

func newEnv(t testing.TB, persist ...string) *env {
	s := fabrictest.StartNATS(t, nil)
	return &env{t: t, natsURL: s.ClientURL(), prefix: fabrictest.TestPrefix(t), persist: persist}
}

// instance starts a Fabric instance on the env's NATS, with history.
func (e *env) instance() *fabrictest.Instance {
	e.t.Helper()
	o := fabrictest.Options{NATSURL: e.natsURL, Prefix: e.prefix}
	if len(e.persist) > 0 {
		o.Node.Persistent = fabric.MatchTopics(e.persist)
	}
	o.History = func(i *fabrictest.Instance) (fabric.History, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		h, err := fjs.NewHistory(ctx, i.JS, fjs.HistoryOptions{Prefix: e.prefix, Partitions: 4, MaxPerTopic: 20000})
		if err == nil {
			e.t.Cleanup(func() { _ = h.Close() })
		}
		return h, err
	}
	return fabrictest.NewInstance(e.t, o)
}

// bridge starts a bridge on inst with a NATS lease store; it is closed at
// cleanup.
func (e *env) bridge(inst *fabrictest.Instance, o pgbridge.Options) *pgbridge.Bridge {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leases, err := fjs.NewLeaseStore(ctx, inst.JS, fjs.LeaseOptions{Prefix: e.prefix})
	if err != nil {
		e.t.Fatal(err)
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 2 * time.Second
	}
	b, err := pgbridge.New(inst.Node, leases, o)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = b.Close() })
	return b
}

// child starts a bridging instance in a separate process (this test binary
// run with childEnv set), waits until it is up and returns its process and
// lease holder name. It is SIGKILLed at cleanup if still running.
func (e *env) child(pgURL string, o childOpts) (*exec.Cmd, string) {
	e.t.Helper()
	cfg, _ := json.Marshal(childConfig{NATS: e.natsURL, Prefix: e.prefix, Persist: e.persist, PG: pgURL, Opts: o})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(cfg))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe() // the child exits when the test binary does
	if err != nil {
		e.t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		_ = stdin.Close()
	})
	holder := childReady(e.t, bufio.NewReader(stdout))
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	return cmd, holder
}

const childEnv = "PGBRIDGE_TEST_CHILD"

// childOpts are the bridge options a child takes.
type childOpts struct {
	Notify   []string
	Outbox   bool
	LeaseTTL time.Duration
}

type childConfig struct {
	NATS    string
	Prefix  string
	Persist []string
	PG      string
	Opts    childOpts
}

// runChild is a bridging instance's process: a node on the given NATS with
// history and a bridge, running until killed or until its stdin closes.
func runChild() int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "child:", err); return 1 }
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nc, err := nats.Connect(cfg.NATS, nats.MaxReconnects(-1))
	if err != nil {
		return fail(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fail(err)
	}
	hist, err := fjs.NewHistory(ctx, js, fjs.HistoryOptions{Prefix: cfg.Prefix, Partitions: 4, MaxPerTopic: 20000})
	if err != nil {
		return fail(err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	nodeCfg := fabric.Config{Broker: fjs.NewBroker(nc, fjs.BrokerOptions{Prefix: cfg.Prefix}), History: hist, Logger: logger}
	if len(cfg.Persist) > 0 {
		nodeCfg.Persistent = fabric.MatchTopics(cfg.Persist)
	}
	node, err := fabric.NewNode(nodeCfg)
	if err != nil {
		return fail(err)
	}
	leases, err := fjs.NewLeaseStore(ctx, js, fjs.LeaseOptions{Prefix: cfg.Prefix})
	if err != nil {
		return fail(err)
	}
	b, err := pgbridge.New(node, leases, pgbridge.Options{URL: cfg.PG, Notify: cfg.Opts.Notify, Outbox: cfg.Opts.Outbox,
		LeaseTTL: cfg.Opts.LeaseTTL, Logger: logger})
	if err != nil {
		return fail(err)
	}
	if err := b.Start(); err != nil {
		return fail(err)
	}
	fmt.Printf("READY %s\n", b.Holder())
	_, _ = io.Copy(io.Discard, os.Stdin) // until the parent goes away
	_ = b.Close()
	return 0
}

// metric returns the value of the bridge's metric name with the given
// label values (name=value pairs), 0 when absent.
func metric(t testing.TB, b *pgbridge.Bridge, name string, labels ...string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(b); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.Counter != nil:
					return m.Counter.GetValue()
				case m.Gauge != nil:
					return m.Gauge.GetValue()
				}
			}
		}
	}
	return 0
}

func matches(m *dto.Metric, labels []string) bool {
	want := map[string]string{}
	for _, l := range labels {
		k, v, _ := strings.Cut(l, "=")
		want[k] = v
	}
	n := 0
	for _, lp := range m.GetLabel() {
		if v, ok := want[lp.GetName()]; ok {
			if v != lp.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(want)
}

// collector gathers a client's envelopes in the background.
type collector struct {
	mu  sync.Mutex
	got []wsclient.Envelope
	at  []time.Time
}

func collect(t testing.TB, c *wsclient.Client) *collector {
	col := &collector{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for env := range c.Events() {
			now := time.Now()
			col.mu.Lock()
			col.got = append(col.got, env)
			col.at = append(col.at, now)
			col.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return col
}

func (col *collector) snapshot() []wsclient.Envelope {
	col.mu.Lock()
	defer col.mu.Unlock()
	return append([]wsclient.Envelope(nil), col.got...)
}

func (col *collector) len() int {
	col.mu.Lock()
	defer col.mu.Unlock()
	return len(col.got)
}

// find returns the first envelope on topic satisfying ok, if any.
func (col *collector) find(topic string, ok func(wsclient.Envelope) bool) (wsclient.Envelope, time.Time, bool) {
	col.mu.Lock()
	defer col.mu.Unlock()
	for i, e := range col.got {
		if e.Topic == topic && (ok == nil || ok(e)) {
			return e, col.at[i], true
		}
	}
	return wsclient.Envelope{}, time.Time{}, false
}

// waitFor waits for an envelope on topic satisfying ok.
func (col *collector) waitFor(t testing.TB, timeout time.Duration, topic string, ok func(wsclient.Envelope) bool) wsclient.Envelope {
	t.Helper()
	var e wsclient.Envelope
	fabrictest.WaitFor(t, timeout, "a message on "+topic, func() bool {
		var found bool
		e, _, found = col.find(topic, ok)
		return found
	})
	return e
}

// subscribe dials inst and subscribes to topics, returning a collector.
func subscribe(t testing.TB, inst *fabrictest.Instance, topics ...string) *collector {
	t.Helper()
	c := inst.Dial(wsclient.Options{Buffer: 1 << 16})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tp := range topics {
		if err := c.Subscribe(ctx, tp); err != nil {
			t.Fatal(err)
		}
	}
	return collect(t, c)
}

// dataField decodes field of an envelope's data object.
func dataField(e wsclient.Envelope, field string) string {
	var m map[string]json.RawMessage
	if json.Unmarshal(e.Data, &m) != nil {
		return ""
	}
	return strings.Trim(string(m[field]), `"`)
}
