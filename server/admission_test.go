package server

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestAdmission: the options reach the transports and the RPC gate: past
// MaxConcurrent an upgrade gets 503; a class refused on MEMORY gets
// OVERLOADED while other calls pass; clients cannot read the aggregator's
// topic.
func TestAdmission(t *testing.T) {
	o := testOptions(t)
	o.Backend = BackendMemory
	o.HTTP.AllowedOrigins = []string{"*"}
	o.Admission.MaxConcurrent = 1
	o.Admission.Aggregator.Enable = true
	o.Admission.Classes = []admission.ClassConfig{{Name: "heavy", RejectOn: []string{"MEMORY"}, RPC: []string{"reports/*"}}}
	o.Pressure = fabric.PressureOptions{SampleInterval: 10 * time.Millisecond, MemoryLimit: 1} // MEMORY at once
	s := startServer(t, o)
	for _, path := range []string{"reports/big", "chat/say"} {
		s.Node().HandleRPC(path, func(context.Context, *fabric.Call) (any, error) { return "done", nil })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := dial(t, ctx, s, wsclient.Options{})
	fabrictest.WaitFor(t, 5*time.Second, "MEMORY pressure", func() bool { return s.Node().Pressure().Reason == fabric.PressureMemory })
	var re *wsclient.RPCError
	if _, err := c.Call(ctx, "reports/big"); !errors.As(err, &re) || re.Code != fabric.CodeOverloaded {
		t.Fatalf("reports/big under MEMORY pressure: %v, want OVERLOADED", err)
	}
	if res, err := c.Call(ctx, "chat/say"); err != nil || string(res) != `"done"` {
		t.Fatalf("chat/say (no class): %s, %v", res, err)
	}
	var de *wsclient.DeniedError
	if err := c.Subscribe(ctx, fabric.InternalTopicPrefix+"rates"); !errors.As(err, &de) || de.Reason != fabric.CodeForbidden {
		t.Fatalf("subscribe to the aggregator's topic: %v, want FORBIDDEN", err)
	}
	_, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", wsclient.Options{})
	if err == nil {
		t.Fatal("a second connection past MaxConcurrent 1 was accepted")
	}
	resp, err := http.Get("http://" + s.Addr() + "/events?topic=x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("an SSE stream past MaxConcurrent: %s (Retry-After %q), want 503 with Retry-After", resp.Status, resp.Header.Get("Retry-After"))
	}
}
