package jetstream_test

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// userNode authenticates each connection as its X-User header (anonymous
// without one); the user data is {"id": user, "name": "Name of <user>"}.
func userNode() fabric.Config {
	return fabric.Config{Hooks: fabric.Hooks{Connect: func(r *http.Request) (any, error) {
		u := r.Header.Get("X-User")
		if u == "" {
			return nil, nil
		}
		return map[string]any{"id": u, "name": "Name of " + u, "secret": "never shown"}, nil
	}}}
}

// selectName is the presence select of the tests: only the name is public.
func selectName(ud any) any {
	m, ok := ud.(map[string]any)
	if !ok {
		return nil
	}
	return map[string]any{"name": m["name"]}
}

func dialUser(inst *fabrictest.Instance, user string) *wsclient.Client {
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	return inst.Dial(wsclient.Options{Header: h, Buffer: 4096})
}

// event is a presence event with its data decoded.
type event struct {
	Event   string
	Member  fabric.PresenceMember   // join, leave
	Members []fabric.PresenceMember // list
	Keys    []string                // heartbeat
	At      time.Time
}

// nextPresence returns the next event on topic's presence topic, skipping
// heartbeats unless wantHeartbeat.
func nextPresence(ctx context.Context, t *testing.T, c *wsclient.Client, topic string, wantHeartbeat bool) (event, error) {
	t.Helper()
	for {
		e, err := c.Next(ctx)
		if err != nil {
			return event{}, err
		}
		if e.Topic != fabric.PresenceTopicPrefix+topic {
			continue
		}
		ev := event{Event: e.Event, At: time.Now()}
		switch e.Event {
		case "list":
			err = json.Unmarshal(e.Data, &ev.Members)
		case "join", "leave":
			err = json.Unmarshal(e.Data, &ev.Member)
		case "heartbeat":
			if !wantHeartbeat {
				continue
			}
			err = json.Unmarshal(e.Data, &ev.Keys)
		default:
			t.Fatalf("unexpected presence event %q: %s", e.Event, e.Data)
		}
		if err != nil {
			t.Fatalf("presence %s data: %v", e.Event, err)
		}
		return ev, nil
	}
}

// mustPresence is nextPresence that fails the test after d.
func mustPresence(t *testing.T, c *wsclient.Client, topic string, d time.Duration) event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	ev, err := nextPresence(ctx, t, c, topic, false)
	if err != nil {
		t.Fatalf("no presence event on %s within %s: %v", topic, d, err)
	}
	return ev
}

// quiet fails the test if a join, leave or list arrives on topic within d.
func quiet(t *testing.T, c *wsclient.Client, topic string, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if ev, err := nextPresence(ctx, t, c, topic, false); err == nil {
		t.Fatalf("unexpected presence event on %s: %+v", topic, ev)
	}
}

func wantEvent(t *testing.T, ev event, name, key string) {
	t.Helper()
	if ev.Event != name || ev.Member.Key != key {
		t.Fatalf("got %s %q, want %s %q", ev.Event, ev.Member.Key, name, key)
	}
}

func keysOf(ms []fabric.PresenceMember) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.Key)
	}
	slices.Sort(out)
	return out
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
