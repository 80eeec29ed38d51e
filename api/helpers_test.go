package api_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/api"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/memory"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// instance is one Fabric instance as the tests see it: its API and a way
// to connect users to it.
type instance struct {
	t      *testing.T
	node   *fabric.Node
	apiURL string // http://127.0.0.1:port/api/ (with the method appended)
	wsURL  string
}

// userHooks authenticates each connection as its X-User header (anonymous
// without one); the user data is {"id": user, "name": "Name of <user>"}.
func userHooks() fabric.Hooks {
	return fabric.Hooks{Connect: func(r *http.Request) (any, error) {
		u := r.Header.Get("X-User")
		if u == "" {
			return nil, nil
		}
		return map[string]any{"id": u, "name": "Name of " + u}, nil
	}}
}

// selectName is the presence select of the tests: only the name is public.
func selectName(ud any) any {
	m, ok := ud.(map[string]any)
	if !ok {
		return nil
	}
	return map[string]any{"name": m["name"]}
}

// presenceOptions: subscribers of room:* join presence, with short
// heartbeats.
func presenceOptions() fabric.PresenceOptions {
	return fabric.PresenceOptions{Topics: fabric.MatchTopics([]string{"room:*"}), Select: selectName,
		HeartbeatInterval: 200 * time.Millisecond, ExpireAfter: time.Second}
}

// memOptions configures memCluster.
type memOptions struct {
	noHistory, noPresence, noCluster bool
	api                              api.Options // Node, Cluster and Presence are filled in
}

// memCluster starts n instances on one memory backend, each a Node with a
// WebSocket edge and the API (mounted at /api/) on its own HTTP server.
func memCluster(t *testing.T, n int, o memOptions) []*instance {
	t.Helper()
	b := memory.New(memory.Options{})
	t.Cleanup(func() { _ = b.Close() })
	out := make([]*instance, n)
	for i := range out {
		br := b.Broker()
		cfg := fabric.Config{Broker: br, Hooks: userHooks(), Logger: fabrictest.Logger(t)}
		if !o.noHistory {
			cfg.History = b.History()
		}
		node, err := fabric.NewNode(cfg)
		if err != nil {
			t.Fatal(err)
		}
		edge, err := wsedge.New(node, wsedge.Options{})
		if err != nil {
			t.Fatal(err)
		}
		ao := o.api
		ao.Node = node
		if !o.noCluster {
			cl := b.Cluster(node)
			t.Cleanup(func() { _ = cl.Close() })
			ao.Cluster = cl
		}
		if !o.noPresence {
			p, err := fabric.NewPresence(context.Background(), node, b.PresenceStore(), presenceOptions())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = p.Close() })
			ao.Presence = p
		}
		mux := http.NewServeMux()
		mux.Handle("/ws", edge)
		mux.Handle("/api/", api.New(ao))
		srv := httptest.NewServer(mux)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = edge.Shutdown(ctx)
			srv.Close()
			_ = node.Close()
			_ = br.Close()
		})
		out[i] = &instance{t: t, node: node, apiURL: srv.URL + "/api/", wsURL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"}
	}
	return out
}

// natsCluster starts two instances routed together (real NATS, clustered
// JetStream), each with history, presence, a cluster view and the API
// (mounted at /fabric/api/, as fabrictest serves the old /api/publish).
func natsCluster(t *testing.T) []*instance {
	t.Helper()
	insts := fabrictest.Cluster(t, 2, fabrictest.Options{
		Node: fabric.Config{Hooks: userHooks()},
		History: func(inst *fabrictest.Instance) (fabric.History, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return jetstream.NewHistory(ctx, inst.JS, jetstream.HistoryOptions{Prefix: inst.Broker.Prefix()})
		},
	})
	// The cluster views and presence stores need clustered JetStream, so
	// they start once every instance runs; the mux takes the API then.
	for _, inst := range insts {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cl, err := jetstream.NewCluster(ctx, inst.Node, inst.NC, jetstream.ClusterOptions{
			Prefix: inst.Broker.Prefix(), HeartbeatInterval: 200 * time.Millisecond, Name: inst.Node.ID()})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		p := fabrictest.StartPresence(t, inst, presenceOptions())
		inst.Mux.Handle("/fabric/api/", api.New(api.Options{Node: inst.Node, Cluster: cl, Presence: p, Prefix: "/fabric/api/"}))
	}
	out := make([]*instance, len(insts))
	for i, inst := range insts {
		out[i] = &instance{t: t, node: inst.Node, apiURL: inst.HTTP.URL + "/fabric/api/", wsURL: inst.WSURL}
	}
	// Every instance knows the other before the tests count on it.
	for _, in := range out {
		fabrictest.WaitFor(t, 15*time.Second, "both instances in info", func() bool {
			status, body := in.call("info", `{}`, "")
			return status == 200 && len(decode(t, body)["instances"].([]any)) == 2
		})
	}
	return out
}

// dial connects user ("" anonymous) to the instance; closed at cleanup.
func (in *instance) dial(user string) *wsclient.Client {
	in.t.Helper()
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wsclient.Dial(ctx, in.wsURL, wsclient.Options{Header: h, Buffer: 4096})
	if err != nil {
		in.t.Fatalf("dial %s: %v", in.wsURL, err)
	}
	in.t.Cleanup(func() { c.Close() })
	return c
}

// call POSTs body to the API method and returns the status and body.
func (in *instance) call(method, body, key string) (int, string) {
	in.t.Helper()
	return post(in.t, in.apiURL+method, body, key)
}

func post(t *testing.T, url, body, key string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", url, ct)
	}
	return resp.StatusCode, string(b)
}

// must calls method and fails the test unless it answers 200.
func (in *instance) must(method, body string) map[string]any {
	in.t.Helper()
	status, resp := in.call(method, body, "")
	if status != http.StatusOK {
		in.t.Fatalf("%s %s: %d %s", method, body, status, resp)
	}
	m := decode(in.t, resp)
	if m["ok"] != true {
		in.t.Fatalf("%s %s: no ok in %s", method, body, resp)
	}
	return m
}

// wantError calls method and checks the status and error code.
func (in *instance) wantError(method, body string, status int, code string) {
	in.t.Helper()
	got, resp := in.call(method, body, "")
	checkError(in.t, method+" "+clip(body), got, resp, status, code)
}

func checkError(t *testing.T, what string, status int, body string, wantStatus int, wantCode string) {
	t.Helper()
	var e struct {
		Error *api.Error `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == nil {
		t.Errorf("%s: %d %q is not an error body", what, status, body)
		return
	}
	if status != wantStatus || e.Error.Code != wantCode || e.Error.Message == "" {
		t.Errorf("%s: %d %s; want %d %s", what, status, body, wantStatus, wantCode)
	}
	if api.Status(e.Error.Code) != status {
		t.Errorf("%s: code %s answered with %d, Status says %d", what, e.Error.Code, status, api.Status(e.Error.Code))
	}
}

func decode(t *testing.T, body string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		t.Fatalf("answer %q: %v", body, err)
	}
	return m
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// next returns c's next envelope on topic, skipping others and probes.
func next(t *testing.T, ctx context.Context, c *wsclient.Client, topic string) wsclient.Envelope {
	t.Helper()
	for {
		e, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for a message on %s: %v", topic, err)
		}
		if e.Topic == topic && e.Event != probe {
			return e
		}
	}
}

// probe is the event of the messages settle sends.
const probe = "probe"

// settle waits until a publish on topic from every instance reaches every
// client in subs: NATS routes carry a new subscription's interest to the
// other servers shortly after the subscribe is acknowledged, and a publish
// before that does not reach it.
func settle(t *testing.T, ctx context.Context, topic string, from []*instance, subs ...*wsclient.Client) {
	t.Helper()
	for _, in := range from {
		for _, c := range subs {
			// The client's own probes: it reads them while others are sent.
			got := make(chan struct{})
			go func() {
				defer close(got)
				for {
					e, err := c.Next(ctx)
					if err != nil || e.Topic == topic && e.Event == probe {
						return
					}
				}
			}()
			fabrictest.WaitFor(t, 15*time.Second, "a probe on "+topic, func() bool {
				in.must("publish", `{"topic":"`+topic+`","event":"`+probe+`"}`)
				select {
				case <-got:
					return true
				case <-time.After(50 * time.Millisecond):
					return false
				}
			})
		}
	}
}
