package api_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestClusterWideMemory runs the cluster-wide scenario on two Nodes of one
// memory backend.
func TestClusterWideMemory(t *testing.T) {
	insts := memCluster(t, 2, memOptions{})
	testClusterWide(t, insts[0], insts[1])
}

// TestClusterWideNATS runs the cluster-wide scenario on two instances with
// their own embedded NATS servers routed together.
func TestClusterWideNATS(t *testing.T) {
	insts := natsCluster(t)
	testClusterWide(t, insts[0], insts[1])
}

// testClusterWide: every method called on one instance acts on, or
// reports, the connections of both.
func testClusterWide(t *testing.T, a, b *instance) {
	ctx := testCtx(t, 120*time.Second)
	alice, alice2 := b.dial("alice"), a.dial("alice")
	bob, anon := b.dial("bob"), a.dial("")
	for _, s := range []struct {
		c      *wsclient.Client
		topics []string
	}{{alice, []string{"room:1"}}, {alice2, []string{"news"}}, {bob, []string{"room:1", "news"}}, {anon, []string{"room:2"}}} {
		for _, topic := range s.topics {
			if err := s.c.Subscribe(ctx, topic); err != nil {
				t.Fatal(err)
			}
		}
	}

	settle(t, ctx, "news", []*instance{a, b}, bob, alice2)
	settle(t, ctx, "room:1", []*instance{a, b}, bob, alice)

	t.Run("publish", func(t *testing.T) {
		if m := a.must("publish", `{"topic":"news","event":"headline","data":{"n":1}}`); m["seq"] != nil {
			t.Fatalf("a publish to a topic without history answered %v", m)
		}
		for _, c := range []*wsclient.Client{bob, alice2} {
			if e := next(t, ctx, c, "news"); e.Event != "headline" || string(e.Data) != `{"n":1}` {
				t.Fatalf("got %+v", e)
			}
		}
	})

	var seq float64
	t.Run("history", func(t *testing.T) {
		seq = b.must("publish", `{"topic":"chat:1","event":"m","data":[1,"x"],"persist":true}`)["seq"].(float64)
		b.must("publish", `{"topic":"chat:1","event":"m2","persist":true}`)
		h := a.must("history", `{"topic":"chat:1","limit":1}`)
		msgs := h["messages"].([]any)
		if len(msgs) != 1 || h["more"] != true || h["complete"] != true || h["epoch"] == "" {
			t.Fatalf("history: %v", h)
		}
		m := msgs[0].(map[string]any)
		if data, _ := json.Marshal(m["data"]); m["seq"] != seq || m["event"] != "m" || string(data) != `[1,"x"]` {
			t.Fatalf("history message %v, want seq %v", m, seq)
		}
		h = a.must("history", fmt.Sprintf(`{"topic":"chat:1","since":%d}`, int(seq)))
		msgs = h["messages"].([]any)
		if len(msgs) != 1 || h["more"] != false || msgs[0].(map[string]any)["event"] != "m2" || msgs[0].(map[string]any)["data"] != nil {
			t.Fatalf("history since %v: %v", seq, h)
		}
	})

	t.Run("batch", func(t *testing.T) {
		r := a.must("batch", `{"messages":[{"topic":"news","event":"b1","data":1},{"topic":"bad\"","event":"x"},`+
			`{"topic":"__rpc","event":"x"},{"topic":"news","event":"b2","data":2},{"topic":"chat:1","event":"b3","persist":true}]}`)
		res := r["results"].([]any)
		want := []string{"", "INVALID_TOPIC", "RESERVED_TOPIC", "", ""}
		if len(res) != len(want) {
			t.Fatalf("results %v", res)
		}
		for i, w := range want {
			x := res[i].(map[string]any)
			if w == "" && x["ok"] != true || w != "" && x["error"].(map[string]any)["code"] != w {
				t.Errorf("result %d: %v, want %q", i, x, w)
			}
		}
		if s, _ := res[4].(map[string]any)["seq"].(float64); s <= seq {
			t.Errorf("the persistent message of the batch has seq %v, after %v", s, seq)
		}
		for _, want := range []string{"b1", "b2"} {
			for _, c := range []*wsclient.Client{bob, alice2} {
				if e := next(t, ctx, c, "news"); e.Event != want {
					t.Fatalf("got %+v, want %s (batches publish in order)", e, want)
				}
			}
		}
	})

	t.Run("broadcast", func(t *testing.T) {
		r := b.must("broadcast", `{"topics":["news","room:1","__presence:x"],"event":"all","data":{"v":"hi"}}`)
		res := r["results"].([]any)
		if len(res) != 3 || res[0].(map[string]any)["ok"] != true || res[1].(map[string]any)["ok"] != true ||
			res[2].(map[string]any)["error"].(map[string]any)["code"] != "RESERVED_TOPIC" {
			t.Fatalf("results %v", res)
		}
		// Topics are not ordered with each other: wait for each one's.
		for c, topics := range map[*wsclient.Client][]string{bob: {"news", "room:1"}, alice: {"room:1"}, alice2: {"news"}} {
			for len(topics) > 0 {
				e, err := c.Next(ctx)
				if err != nil {
					t.Fatalf("waiting for the broadcast on %v: %v", topics, err)
				}
				if i := slices.Index(topics, e.Topic); i >= 0 && e.Event != probe {
					if e.Event != "all" || string(e.Data) != `{"v":"hi"}` {
						t.Fatalf("got %+v", e)
					}
					topics = slices.Delete(topics, i, i+1)
				}
			}
		}
	})

	t.Run("channels", func(t *testing.T) {
		for _, tc := range []struct {
			body      string
			want      map[string]float64
			truncated bool
		}{
			{`{}`, map[string]float64{"news": 2, "room:1": 2, "room:2": 1}, false},
			{`{"pattern":"room:*"}`, map[string]float64{"room:1": 2, "room:2": 1}, false},
			{`{"limit":1}`, map[string]float64{"news": 2}, true},
		} {
			for _, in := range []*instance{a, b} {
				r := in.must("channels", tc.body)
				got := map[string]float64{}
				for k, v := range r["channels"].(map[string]any) {
					got[k] = v.(float64)
				}
				if !maps.Equal(got, tc.want) || r["truncated"] != tc.truncated {
					t.Errorf("channels %s: %v; want %v truncated %v", tc.body, r, tc.want, tc.truncated)
				}
			}
		}
	})

	t.Run("info", func(t *testing.T) {
		r := b.must("info", ``)
		ins := r["instances"].([]any)
		conns := 0.0
		ids := map[any]bool{}
		for _, x := range ins {
			m := x.(map[string]any)
			conns += m["connections"].(float64)
			ids[m["id"]] = true
			if m["subscriptions"].(float64) < 2 || m["topics"].(float64) < 2 || m["uptime"] == nil {
				t.Errorf("instance %v", m)
			}
		}
		if len(ins) != 2 || conns != 4 || !ids[a.node.ID()] || !ids[b.node.ID()] {
			t.Fatalf("info: %v", r)
		}
	})

	t.Run("presence", func(t *testing.T) {
		fabrictest.WaitFor(t, 10*time.Second, "alice and bob present on room:1 from a", func() bool {
			r := a.must("presence", `{"topic":"room:1"}`)
			b, _ := json.Marshal(r["members"])
			return string(b) == `[{"data":{"name":"Name of alice"},"key":"alice"},{"data":{"name":"Name of bob"},"key":"bob"}]`
		})
		if r := b.must("presence", `{"topic":"room:nobody"}`); len(r["members"].([]any)) != 0 {
			t.Fatalf("presence of an empty topic: %v", r)
		}
	})

	t.Run("unsubscribe", func(t *testing.T) {
		if r := a.must("unsubscribe", `{"user":"bob","topic":"news"}`); r["unsubscribed"] != 1.0 {
			t.Fatalf("unsubscribe bob (on b) from a: %v", r)
		}
		if r := b.must("channels", `{"pattern":"news"}`); r["channels"].(map[string]any)["news"] != 1.0 {
			t.Fatalf("news after the unsubscribe: %v", r)
		}
		if r := a.must("unsubscribe", `{"user":"bob","topic":"news"}`); r["unsubscribed"] != 0.0 {
			t.Fatalf("a second unsubscribe: %v", r)
		}
		a.must("publish", `{"topic":"room:1","event":"after","data":null}`)
		if e := next(t, ctx, bob, "room:1"); e.Event != "after" { // bob kept room:1
			t.Fatalf("bob got %+v", e)
		}
	})

	t.Run("disconnect", func(t *testing.T) {
		if r := a.must("disconnect", `{"user":"alice","code":4001,"reason":"bye"}`); r["disconnected"] != 2.0 {
			t.Fatalf("disconnect alice (on a and b) from a: %v", r)
		}
		for i, c := range []*wsclient.Client{alice, alice2} {
			fabrictest.WaitFor(t, 10*time.Second, "alice's close frame", func() bool {
				code, _ := c.CloseCode()
				return code != 0
			})
			if code, reason := c.CloseCode(); code != 4001 || reason != "bye" {
				t.Fatalf("alice's connection %d closed with %d %q", i, code, reason)
			}
		}
		fabrictest.WaitFor(t, 10*time.Second, "two connections left", func() bool {
			r := b.must("info", `{}`)
			n := 0.0
			for _, x := range r["instances"].([]any) {
				n += x.(map[string]any)["connections"].(float64)
			}
			return n == 2
		})
		if code, _ := bob.CloseCode(); code != 0 {
			t.Fatalf("bob was closed with %d", code)
		}
		if r := b.must("disconnect", `{"user":"alice"}`); r["disconnected"] != 0.0 {
			t.Fatalf("a second disconnect: %v", r)
		}
		if r := b.must("disconnect", `{"user":42}`); r["disconnected"] != 0.0 { // numeric ids are their decimal text
			t.Fatalf("disconnect of user 42: %v", r)
		}
	})
}
