package admission_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
	"github.com/fabricrt/fabric/sse"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/prometheus/client_golang/prometheus"
)

// memCluster returns n nodes sharing one memory backend: a cluster in one
// process. Each node gets its own registry.
func memCluster(t *testing.T, n int, cfg fabric.Config) ([]*fabric.Node, []*prometheus.Registry) {
	t.Helper()
	be := memory.New(memory.Options{})
	t.Cleanup(func() { be.Close() })
	nodes := make([]*fabric.Node, n)
	regs := make([]*prometheus.Registry, n)
	for i := range nodes {
		c := cfg
		br := be.Broker()
		c.Broker = br
		regs[i] = prometheus.NewRegistry()
		c.Registerer = regs[i]
		node, err := fabric.NewNode(c)
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = node
		t.Cleanup(func() { node.Close(); br.Close() })
	}
	return nodes, regs
}

// serve runs node's WebSocket and SSE transports on a loopback HTTP server
// and returns its base URL.
func serve(t *testing.T, node *fabric.Node) string {
	t.Helper()
	edge, err := wsedge.New(node, wsedge.Options{AllowedOrigins: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	events, err := sse.New(node, sse.Options{AllowedOrigins: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/ws", edge)
	mux.Handle("/events", events)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = edge.Shutdown(ctx)
		_ = events.Shutdown(ctx)
		srv.Close()
	})
	return srv.URL
}

func dial(t *testing.T, url string) *wsclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wsclient.Dial(ctx, url, wsclient.Options{})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func wsURL(base string) string { return "ws" + strings.TrimPrefix(base, "http") + "/ws" }

// publisher publishes to topic on node at rate messages per second until
// stopped.
type publisher struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func publishAt(t *testing.T, node *fabric.Node, topic string, rate float64) *publisher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &publisher{cancel: cancel}
	env := fabric.Envelope(topic, "tick", []byte(`{"n":1}`))
	p.wg.Go(func() {
		start := time.Now()
		sent := 0
		for ctx.Err() == nil {
			due := int(time.Since(start).Seconds() * rate)
			for ; sent < due; sent++ {
				if _, err := node.PublishEnvelope(ctx, topic, env); err != nil {
					return // the node or broker closed
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
	t.Cleanup(p.stop)
	return p
}

func (p *publisher) stop() { p.cancel(); p.wg.Wait() }

// waitFor polls cond until it holds or the timeout passes; it returns how
// long that took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// metric returns the value of name with the given label values (in label
// order), 0 when absent.
func metric(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i, l := range labels {
				if i >= len(m.GetLabel()) || m.GetLabel()[i].GetValue() != l {
					continue next
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}
