package wsedge_test

import (
	"testing"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestSession: the session protocol's shared cases over WebSocket; sse runs
// the same table over Server-Sent Events.
func TestSession(t *testing.T) {
	fabrictest.RunSessionCases(t, func(inst *fabrictest.Instance, o wsclient.Options) *wsclient.Client {
		return inst.Dial(o)
	})
}
