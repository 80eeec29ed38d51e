package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestServeReplayAcrossRestart: with --replay, POST /api/publish answers
// the seq; after a restart on the same data dir a client resumes from it.
func TestServeReplayAcrossRestart(t *testing.T) {
	cfg := testConfig(t)
	cfg.Ext.Replay = "chat:*"
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	publish := func(s *server, body string) uint64 {
		t.Helper()
		resp, err := http.Post("http://"+s.Addr()+"/api/publish", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var out struct{ Seq uint64 }
		if resp.StatusCode != 200 || json.Unmarshal(b, &out) != nil {
			t.Fatalf("publish %s: %d %s", body, resp.StatusCode, b)
		}
		return out.Seq
	}
	s, err := start(ctx, cfg, fabrictest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for i := range 5 {
		seqs = append(seqs, publish(s, `{"topic":"chat:1","event":"msg","data":`+string(rune('0'+i))+`}`))
	}
	if seqs[0] == 0 || seqs[4] <= seqs[3] {
		t.Fatalf("seqs %v", seqs)
	}
	if seq := publish(s, `{"topic":"other","event":"msg","data":1}`); seq != 0 {
		t.Fatalf("non-persistent topic got seq %d", seq)
	}
	if seq := publish(s, `{"topic":"other","event":"msg","data":2,"persist":true}`); seq == 0 {
		t.Fatal(`"persist":true got no seq`)
	}
	if err := s.shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	s, err = start(ctx, cfg, fabrictest.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	c, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SubscribeSince(ctx, "chat:1", seqs[1]); err != nil {
		t.Fatal(err)
	}
	for _, want := range seqs[2:] {
		ev, err := c.Next(ctx)
		if err != nil || ev.Topic != "chat:1" || ev.Seq != want {
			t.Fatalf("got %+v, %v; want chat:1 seq %d", ev, err, want)
		}
	}
	ev, err := c.Next(ctx)
	if err != nil || ev.Topic != "__replay:chat:1" || ev.Event != "end" ||
		!strings.Contains(string(ev.Data), `"recovered":true`) {
		t.Fatalf("got %+v, %v; want the end of the replay", ev, err)
	}
}
