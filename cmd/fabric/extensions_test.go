package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in     string
		points int
		iv     time.Duration
		ok     bool
	}{
		{"30/10s", 30, 10 * time.Second, true},
		{" 100 / 1m ", 100, time.Minute, true},
		{"30/10000", 30, 10 * time.Second, true},
		{"30", 0, 0, false}, {"0/1s", 0, 0, false}, {"x/1s", 0, 0, false}, {"5/soon", 0, 0, false}, {"5/-1s", 0, 0, false},
	} {
		p, iv, err := parseRate(tc.in)
		if (err == nil) != tc.ok || p != tc.points || iv != tc.iv {
			t.Errorf("parseRate(%q) = %d, %s, %v", tc.in, p, iv, err)
		}
	}
}

// TestServePresenceAndRateLimit runs `fabric serve --presence 'room:*'
// --rpc-rate-limit 2/1m` and checks both over a real WebSocket.
func TestServePresenceAndRateLimit(t *testing.T) {
	var cfg config
	fs := serveFlags(&cfg)
	if err := fs.parse([]string{"--listen", "127.0.0.1:0", "--data", t.TempDir(), "--subject-prefix", "svtest",
		"--presence", "room:*", "--presence-heartbeat", "200ms", "--presence-expire", "1s", "--rpc-rate-limit", "2/1m"}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	s.node.HandleRPC("demo/ping", func(context.Context, *fabric.Call) (any, error) { return "pong", nil })
	url := "ws://" + s.Addr() + "/ws"

	obs, err := wsclient.Dial(ctx, url, wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	if err := obs.Subscribe(ctx, "__presence:room:1"); err != nil {
		t.Fatal(err)
	}
	e, err := obs.Next(ctx)
	if err != nil || e.Event != "list" || string(e.Data) != "[]" {
		t.Fatalf("got %+v %v, want an empty list", e, err)
	}
	member, err := wsclient.Dial(ctx, url, wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := member.Subscribe(ctx, "room:1"); err != nil {
		t.Fatal(err)
	}
	if err := member.Subscribe(ctx, "other"); err != nil { // not a presence topic
		t.Fatal(err)
	}
	e, err = obs.Next(ctx)
	var m fabric.PresenceMember
	if err != nil || e.Event != "join" || json.Unmarshal(e.Data, &m) != nil || m.Key == "" {
		t.Fatalf("got %+v %v, want a join with a per-connection key", e, err)
	}
	for i := range 2 {
		if _, err := member.Call(ctx, "demo/ping"); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	_, err = member.Call(ctx, "demo/ping")
	var rpcErr *wsclient.RPCError
	if !errors.As(err, &rpcErr) || rpcErr.Code != fabric.CodeRateLimited {
		t.Fatalf("third call: %v, want RATE_LIMITED", err)
	}
	member.Close()
	for {
		e, err = obs.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Event == "leave" {
			break
		}
		if e.Event != "heartbeat" {
			t.Fatalf("got %+v, want the leave", e)
		}
	}
}
