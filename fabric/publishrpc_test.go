package fabric_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestPublishRPC: a client publishes through fabric/publish where allowed;
// other topics, reserved topics and bad arguments are refused with codes.
func TestPublishRPC(t *testing.T) {
	match := fabric.MatchTopics([]string{"chat:*"})
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: fabric.Config{Hooks: fabric.Hooks{
		Publish: func(_ *fabric.Client, topic, _ string) error {
			if match(topic) {
				return nil
			}
			return errors.New("not here")
		},
	}}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sub := inst.Dial(wsclient.Options{})
	if err := sub.Subscribe(ctx, "chat:1"); err != nil {
		t.Fatal(err)
	}
	pub := inst.Dial(wsclient.Options{})
	res, err := pub.Call(ctx, fabric.PublishRPCPath, "chat:1", "created", map[string]any{"text": "hi"})
	if err != nil || string(res) != `{"seq":0}` {
		t.Fatalf("publish: %s, %v", res, err)
	}
	ev, err := sub.Next(ctx)
	if err != nil || ev.Topic != "chat:1" || ev.Event != "created" || string(ev.Data) != `{"text":"hi"}` {
		t.Fatalf("got %+v, %v", ev, err)
	}
	for _, tc := range []struct {
		args []any
		code string
	}{
		{[]any{"other", "e", 1}, fabric.CodeForbidden},
		{[]any{"__rpc", "e", 1}, fabric.CodeForbidden},
		{[]any{"chat:\u0001", "e", 1}, fabric.CodeInvalidTopic},
		{[]any{"chat:1", `bad"event`, 1}, fabric.CodeValidation},
		{[]any{"chat:1"}, fabric.CodeValidation},
		{[]any{42, "e"}, fabric.CodeValidation},
	} {
		_, err := pub.Call(ctx, fabric.PublishRPCPath, tc.args...)
		var re *wsclient.RPCError
		if !errors.As(err, &re) || re.Code != tc.code {
			t.Errorf("publish %v: %v, want %s", tc.args, err, tc.code)
		}
	}
}
