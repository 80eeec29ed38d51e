package sse_test

import (
	"testing"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestSession: the session protocol's shared cases over SSE (GET stream,
// POSTed frames); wsedge runs the same table over WebSocket.
func TestSession(t *testing.T) {
	fabrictest.RunSessionCases(t, func(inst *fabrictest.Instance, o wsclient.Options) *wsclient.Client {
		return inst.DialSSE(o)
	})
}
