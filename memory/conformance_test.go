package memory_test

import (
	"testing"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/backendtest"
	"github.com/fabricrt/fabric/memory"
)

// TestConformance runs the backend conformance suite on the memory backend:
// the instances of a deployment are Nodes sharing one Backend.
func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Backend{
		Name: "memory",
		New: func(t *testing.T, o backendtest.Options) backendtest.Deployment {
			b := memory.New(memory.Options{MaxPerTopic: o.MaxPerTopic})
			t.Cleanup(func() { _ = b.Close() })
			return deployment{b}
		},
	})
}

type deployment struct{ b *memory.Backend }

func (d deployment) Instance(t *testing.T) backendtest.Instance {
	br := d.b.Broker()
	t.Cleanup(func() { _ = br.Close() })
	return backendtest.Instance{
		Broker:   br,
		History:  d.b.History(),
		Presence: d.b.PresenceStore(),
		Limiter: func(_ *testing.T, o backendtest.LimiterOptions) fabric.RateLimiter {
			return d.b.RateLimiter(memory.RateLimitOptions{Name: o.Name, Points: o.Points, Interval: o.Interval})
		},
		Cluster: func(t *testing.T, node *fabric.Node) fabric.ClusterView {
			c := d.b.Cluster(node)
			t.Cleanup(func() { _ = c.Close() })
			return c
		},
		Leases: d.b.Leases(),
	}
}

func (d deployment) WipeHistory(*testing.T) { d.b.WipeHistory() }
