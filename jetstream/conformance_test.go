package jetstream_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/backendtest"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	natsjs "github.com/nats-io/nats.go/jetstream"
)

// TestConformance runs the backend conformance suite on NATS: each
// deployment is one embedded server with JetStream, each instance its own
// connection to it with its own broker, history, presence store, limiters,
// cluster view and lease store, under one subject prefix.
func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Backend{Name: "nats", New: newNATSDeployment})
}

type natsDeployment struct {
	srv    *embed.Server
	prefix string
	opts   backendtest.Options
}

func newNATSDeployment(t *testing.T, o backendtest.Options) backendtest.Deployment {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := embed.Start(ctx, embed.Options{DataDir: t.TempDir(), Logger: fabrictest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return &natsDeployment{srv: srv, prefix: fabrictest.TestPrefix(t), opts: o}
}

func (d *natsDeployment) Instance(t *testing.T) backendtest.Instance {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nc, err := d.srv.Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := natsjs.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	log := fabrictest.Logger(t)
	broker := jetstream.NewBroker(nc, jetstream.BrokerOptions{Prefix: d.prefix})
	t.Cleanup(func() { broker.Close() })
	history, err := jetstream.NewHistory(ctx, js, jetstream.HistoryOptions{Prefix: d.prefix, MaxPerTopic: d.opts.MaxPerTopic, Eager: true})
	if err != nil {
		t.Fatal(err)
	}
	presence, err := jetstream.NewPresenceStore(ctx, js, jetstream.PresenceStoreOptions{Prefix: d.prefix, KeepAlive: 200 * time.Millisecond, MarkerTTL: time.Second, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { presence.Close() })
	return backendtest.Instance{
		Broker:   broker,
		History:  history,
		Presence: presence,
		Limiter: func(t *testing.T, o backendtest.LimiterOptions) fabric.RateLimiter {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			l, err := jetstream.NewRateLimiter(ctx, js, jetstream.RateLimitOptions{Prefix: d.prefix, Name: o.Name, Points: o.Points, Interval: o.Interval, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			return l
		},
		Cluster: func(t *testing.T, node *fabric.Node) fabric.ClusterView {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cl, err := jetstream.NewCluster(ctx, node, nc, jetstream.ClusterOptions{Prefix: d.prefix, HeartbeatInterval: 200 * time.Millisecond, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cl.Close() })
			return cl
		},
		Leases: natsLeases(t, ctx, js, d.prefix),
	}
}

// WipeHistory deletes every history stream of the deployment's prefix.
func (d *natsDeployment) WipeHistory(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nc, err := d.srv.Connect()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := natsjs.New(nc)
	names := js.StreamNames(ctx)
	var del []string
	for name := range names.Name() {
		if strings.HasPrefix(name, d.prefix+"_history") {
			del = append(del, name)
		}
	}
	if names.Err() != nil {
		t.Fatal(names.Err())
	}
	if len(del) == 0 {
		t.Fatal("no history stream to wipe")
	}
	for _, name := range del {
		if err := js.DeleteStream(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
}

// natsLeases is the deployment's lease store.
func natsLeases(t *testing.T, ctx context.Context, js natsjs.JetStream, prefix string) fabric.LeaseStore {
	l, err := jetstream.NewLeaseStore(ctx, js, jetstream.LeaseOptions{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return l
}
