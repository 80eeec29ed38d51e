// Package backendtest is the conformance suite of Fabric backends: one set
// of behaviour tests, written against the interfaces of fabric/backend.go
// only, that every backend (memory, NATS, and any later one) passes
// unchanged. A backend's own test file calls Run with a Backend that starts
// its deployments; see memory/conformance_test.go and
// jetstream/conformance_test.go.
//
// Every test runs real Nodes on the backend, with recording transports in
// place of sockets, and several instances of one deployment where the
// behaviour crosses instances.
package backendtest

import (
	"context"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Backend describes a backend to the suite.
type Backend struct {
	// Name names the backend in test output.
	Name string
	// New starts a fresh deployment, its state isolated from every other
	// deployment, and stops it at t's cleanup.
	New func(t *testing.T, o Options) Deployment
}

// Options are what the suite asks of a deployment.
type Options struct {
	// MaxPerTopic is how many messages each topic's history keeps
	// (0: the backend's default, at least 200).
	MaxPerTopic int
}

// Deployment is one running backend shared by several instances.
type Deployment interface {
	// Instance starts one more instance of the deployment; what it
	// returns is stopped at the test's cleanup.
	Instance(t *testing.T) Instance
	// WipeHistory destroys every topic's history, as an operator deleting
	// the store would: epochs change.
	WipeHistory(t *testing.T)
}

// Instance is the backend as one Fabric instance sees it.
type Instance struct {
	// Broker and History are the Node's.
	Broker  fabric.Broker
	History fabric.History
	// Presence is the presence store.
	Presence fabric.PresenceStore
	// Limiter returns a rate limiter sharing its state with the limiters
	// of the same name on every instance of the deployment.
	Limiter func(t *testing.T, o LimiterOptions) fabric.RateLimiter
	// Cluster returns the cluster view of node (a Node on this instance).
	Cluster func(t *testing.T, node *fabric.Node) fabric.ClusterView
	// Leases is the lease store.
	Leases fabric.LeaseStore
}

// LimiterOptions configure Instance.Limiter.
type LimiterOptions struct {
	Name     string
	Points   int
	Interval time.Duration
}

// Run runs every conformance test against b.
func Run(t *testing.T, b Backend) {
	t.Run("PubSub", func(t *testing.T) { testPubSub(t, b) })
	t.Run("PersistentOrder", func(t *testing.T) { testPersistentOrder(t, b) })
	t.Run("ResumeSeam", func(t *testing.T) { testResumeSeam(t, b) })
	t.Run("Truncation", func(t *testing.T) { testTruncation(t, b) })
	t.Run("Epoch", func(t *testing.T) { testEpoch(t, b) })
	t.Run("HistoryReads", func(t *testing.T) { testHistoryReads(t, b) })
	t.Run("IdempotentAppend", func(t *testing.T) { testIdempotentAppend(t, b) })
	t.Run("Presence", func(t *testing.T) { testPresence(t, b) })
	t.Run("PresenceExpiry", func(t *testing.T) { testPresenceExpiry(t, b) })
	t.Run("Limiter", func(t *testing.T) { testLimiter(t, b) })
	t.Run("Cluster", func(t *testing.T) { testCluster(t, b) })
	t.Run("Leases", func(t *testing.T) { testLeases(t, b) })
}

// node starts a Node on inst; persistent selects its persistent topics.
func node(t *testing.T, inst Instance, persistent func(string) bool) *fabric.Node {
	t.Helper()
	n, err := fabric.NewNode(fabric.Config{Broker: inst.Broker, History: inst.History, Persistent: persistent})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds, failing the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func all(string) bool { return true }
