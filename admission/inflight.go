package admission

import (
	"context"
	"sync/atomic"

	"github.com/fabricrt/fabric/fabric"
)

// InFlight counts the calls of a class that are running, so that a
// Predicate can cap them: the protection for a CPU-bound class, whose
// overload shows in no pressure signal (the calls wait in the sockets, not
// in memory). Wrap the class's handlers with Wrap and give the class the
// rule Below(n).
//
//	var reports admission.InFlight
//	node.HandleRPC("reports/build", reports.Wrap(buildReport))
//	rules := admission.Rules{"reports": reports.Below(runtime.GOMAXPROCS(0))}
type InFlight struct {
	n atomic.Int64
}

// Wrap returns h counted while it runs.
func (f *InFlight) Wrap(h fabric.RPCHandler) fabric.RPCHandler {
	return func(ctx context.Context, call *fabric.Call) (any, error) {
		f.n.Add(1)
		defer f.n.Add(-1)
		return h(ctx, call)
	}
}

// Count returns the calls running.
func (f *InFlight) Count() int { return int(f.n.Load()) }

// Below returns a Predicate that accepts while fewer than limit calls run.
// Calls admitted at the same instant may pass it together: the cap is
// exceeded by at most the calls being admitted concurrently.
func (f *InFlight) Below(limit int) Predicate {
	return func(context.Context, string, *fabric.Node) (bool, error) {
		return f.n.Load() < int64(limit), nil
	}
}
