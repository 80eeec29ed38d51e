package server

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/api"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// testOptions are options for a server on a free loopback port with its own
// data dir, subject prefix and logger.
func testOptions(t *testing.T) Options {
	return Options{
		HTTP:   HTTPOptions{Listen: "127.0.0.1:0"},
		Embed:  EmbedOptions{DataDir: t.TempDir()},
		NATS:   NATSOptions{SubjectPrefix: fabrictest.TestPrefix(t)},
		Logger: fabrictest.Logger(t),
	}
}

// startServer builds a server from o and runs it until the test ends.
func startServer(t *testing.T, o Options) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = s.Close()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

func dial(t *testing.T, ctx context.Context, s *Server, opts wsclient.Options) *wsclient.Client {
	t.Helper()
	c, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func post(t *testing.T, url, body, key string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestHTTPAPI runs the server on embedded NATS and checks every API answer.
func TestHTTPAPI(t *testing.T) {
	o := testOptions(t)
	o.HTTP.APIKey = "s3cret"
	s := startServer(t, o)
	base := "http://" + s.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := dial(t, ctx, s, wsclient.Options{})
	if err := c.Subscribe(ctx, "orders"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, body, key string
		status          int
	}{
		{"no key", `{"topic":"orders","event":"e","data":1}`, "", 401},
		{"wrong key", `{"topic":"orders","event":"e","data":1}`, "nope", 401},
		{"bad json", `{"topic":`, "s3cret", 400},
		{"bad topic", `{"topic":"a\u0001","event":"e"}`, "s3cret", 400},
		{"reserved topic", `{"topic":"__rpc","event":"e"}`, "s3cret", 400},
		{"no event", `{"topic":"orders"}`, "s3cret", 400},
		{"too big", `{"topic":"orders","event":"e","data":"` + strings.Repeat("x", 2<<20) + `"}`, "s3cret", 413},
		{"ok", `{"topic":"orders","event":"created","data":{"id":7}}`, "s3cret", 200},
	} {
		status, body := post(t, base+"/api/publish", tc.body, tc.key)
		if status != tc.status {
			t.Errorf("%s: status %d %s, want %d", tc.name, status, body, tc.status)
		}
		if !json.Valid([]byte(body)) {
			t.Errorf("%s: body is not JSON: %q", tc.name, body)
		}
	}
	e, err := c.Next(ctx)
	if err != nil || e.Event != "created" || string(e.Data) != `{"id":7}` {
		t.Fatalf("subscriber got %+v %v", e, err)
	}
	if status, _ := get(t, base+"/api/publish"); status != http.StatusMethodNotAllowed {
		t.Errorf("GET /api/publish: %d", status)
	}
	_, m := get(t, base+"/metrics")
	for _, name := range []string{"fabric_connections 1", "fabric_subscriptions 1", "fabric_messages_out_total", "fabric_bytes_out_total",
		"fabric_messages_in_total", "fabric_publishes_total 1", "go_goroutines", "fabric_http_requests_in_flight"} {
		if !strings.Contains(m, name) {
			t.Errorf("/metrics lacks %q", name)
		}
	}
	if status, body := get(t, base+"/healthz"); status != 200 || !strings.Contains(body, s.Name()) || s.Name() == "" {
		t.Errorf("/healthz: %d %s (instance %q)", status, body, s.Name())
	}
	if status, body := get(t, base+"/readyz"); status != 200 || !strings.Contains(body, `"ready"`) {
		t.Errorf("/readyz: %d %s", status, body)
	}
}

// TestAPIWithoutKeyIsLoopbackOnly checks the rule for servers without a key.
func TestAPIWithoutKeyIsLoopbackOnly(t *testing.T) {
	o := testOptions(t)
	o.Backend = BackendMemory
	s := startServer(t, o)
	h := api.New(api.Options{Node: s.Node()})
	for _, tc := range []struct {
		remote string
		status int
	}{{"10.1.2.3:5555", 403}, {"[2001:db8::1]:5555", 403}, {"127.0.0.1:5555", 200}, {"[::1]:5555", 200}} {
		req := httptest.NewRequest(http.MethodPost, "/api/publish", strings.NewReader(`{"topic":"t","event":"e"}`))
		req.Header.Set("Content-Type", "application/json")
		req.RemoteAddr = tc.remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.status {
			t.Errorf("from %s: %d, want %d", tc.remote, rec.Code, tc.status)
		}
	}
	// and over a real socket from loopback
	if status, body := post(t, "http://"+s.Addr()+"/api/publish", `{"topic":"t","event":"e"}`, ""); status != 200 {
		t.Fatalf("loopback publish without key: %d %s", status, body)
	}
}

// TestReplayAcrossRestart: with a persistent policy, POST /api/publish
// answers the seq; after a restart on the same data dir a client resumes
// from it.
func TestReplayAcrossRestart(t *testing.T) {
	o := testOptions(t)
	o.Replay.Topics = []string{"chat:*"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	publish := func(s *Server, body string) uint64 {
		t.Helper()
		status, b := post(t, "http://"+s.Addr()+"/api/publish", body, "")
		var out struct{ Seq uint64 }
		if status != 200 || json.Unmarshal([]byte(b), &out) != nil {
			t.Fatalf("publish %s: %d %s", body, status, b)
		}
		return out.Seq
	}
	s, err := New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
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
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-ran; err != nil {
		t.Fatalf("Run: %v", err)
	}

	s = startServer(t, o)
	c := dial(t, ctx, s, wsclient.Options{})
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
	if err != nil || ev.Topic != "__replay:chat:1" || ev.Event != "end" || !strings.Contains(string(ev.Data), `"recovered":true`) {
		t.Fatalf("got %+v, %v; want the end of the replay", ev, err)
	}
}

// TestPresenceAndRateLimit runs presence on room:* and an RPC limit of
// 2/1m on both backends and checks both over a real WebSocket.
func TestPresenceAndRateLimit(t *testing.T) {
	for _, backend := range []string{BackendNATS, BackendMemory} {
		t.Run(backend, func(t *testing.T) {
			o := testOptions(t)
			o.Backend = backend
			o.Topics = []TopicPolicy{{Pattern: "room:*", Presence: true}}
			o.Presence = PresenceOptions{Heartbeat: 200 * time.Millisecond, Expire: time.Second}
			o.RateLimit = RateLimitOptions{Points: 2, Interval: time.Minute}
			s := startServer(t, o)
			s.Node().HandleRPC("demo/ping", func(context.Context, *fabric.Call) (any, error) { return "pong", nil })
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			obs := dial(t, ctx, s, wsclient.Options{})
			if err := obs.Subscribe(ctx, "__presence:room:1"); err != nil {
				t.Fatal(err)
			}
			e, err := obs.Next(ctx)
			if err != nil || e.Event != "list" || string(e.Data) != "[]" {
				t.Fatalf("got %+v %v, want an empty list", e, err)
			}
			member := dial(t, ctx, s, wsclient.Options{})
			if err := member.Subscribe(ctx, "room:1"); err != nil {
				t.Fatal(err)
			}
			if err := member.Subscribe(ctx, "other"); err != nil { // no presence there
				t.Fatal(err)
			}
			for e, err = obs.Next(ctx); err == nil && e.Event == "heartbeat"; e, err = obs.Next(ctx) {
			} // heartbeats (every 200ms) may come before the join on a loaded machine
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
		})
	}
}

// TestTopicPolicies: the first matching policy decides persistence and
// client publish; the policies and the application's Publish hook must
// both accept a client publish.
func TestTopicPolicies(t *testing.T) {
	o := testOptions(t)
	o.Backend = BackendMemory
	o.Topics = []TopicPolicy{
		{Pattern: "chat:secret", Persistent: true},                 // clients may not publish
		{Pattern: "chat:*", Persistent: true, ClientPublish: true}, // they may, and it is kept
		{Pattern: "*", ClientPublish: true},                        // they may, live only
		{Pattern: "never:*", Persistent: true},                     // shadowed by "*"
		{Pattern: "chat:x"},                                        // shadowed by "chat:*"
	}
	o.Hooks.Publish = func(_ *fabric.Client, topic, _ string) error {
		if strings.HasSuffix(topic, ":veto") {
			return fabric.NewLiveError(fabric.CodeForbidden, "vetoed by the app")
		}
		return nil
	}
	s := startServer(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := dial(t, ctx, s, wsclient.Options{})
	for _, tc := range []struct {
		topic   string
		allowed bool
		seq     bool
	}{
		{"chat:1", true, true},
		{"chat:x", true, true}, // chat:* matches first
		{"chat:secret", false, false},
		{"news", true, false},
		{"never:1", true, false}, // "*" matches first
		{"chat:veto", false, false},
	} {
		res, err := c.Call(ctx, fabric.PublishRPCPath, tc.topic, "msg", "hi")
		if tc.allowed != (err == nil) {
			t.Errorf("publish to %s: %v, want allowed=%v", tc.topic, err, tc.allowed)
			continue
		}
		if err == nil && tc.seq == (string(res) == `{"seq":0}`) {
			t.Errorf("publish to %s answered %s, want seq=%v", tc.topic, res, tc.seq)
		}
	}
}

func TestPolicies(t *testing.T) {
	o := Options{
		Topics:        []TopicPolicy{{Pattern: "chat:*", Presence: true}},
		Replay:        ReplayOptions{Topics: []string{"chat:*", "feed:*"}, MaxPerTopic: 200},
		Presence:      PresenceOptions{Topics: []string{"room:*"}},
		ClientPublish: []string{"chat:*", " "},
	}
	ps, err := o.Policies()
	if err != nil {
		t.Fatal(err)
	}
	want := []TopicPolicy{
		{Pattern: "chat:*", Presence: true, Persistent: true, ClientPublish: true},
		{Pattern: "feed:*", Persistent: true},
		{Pattern: "room:*", Presence: true},
	}
	if len(ps) != len(want) {
		t.Fatalf("policies %+v, want %+v", ps, want)
	}
	for i := range want {
		if ps[i] != want[i] {
			t.Errorf("policy %d: %+v, want %+v", i, ps[i], want[i])
		}
	}
	for _, tc := range []struct {
		name   string
		topics []TopicPolicy
		errHas string
	}{
		{"sizes differ", []TopicPolicy{{Pattern: "a", Persistent: true, ReplayMaxPerTopic: 500}, {Pattern: "b", Persistent: true}},
			`topics[1] ("b") keeps 200 messages for ever but topics[0] ("a") keeps 500`},
		{"ages differ", []TopicPolicy{{Pattern: "a", Persistent: true, ReplayMaxAge: time.Hour}, {Pattern: "b", Persistent: true, ReplayMaxAge: time.Minute}},
			"same replay_max_per_topic and replay_max_age"},
		{"size without persistence", []TopicPolicy{{Pattern: "a", ReplayMaxPerTopic: 5}}, "need persistent: true"},
		{"empty pattern", []TopicPolicy{{Persistent: true}}, "empty pattern"},
	} {
		o := Options{Topics: tc.topics, Replay: ReplayOptions{MaxPerTopic: 200}}
		if _, err := o.Policies(); err == nil || !strings.Contains(err.Error(), tc.errHas) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.errHas)
		}
	}
	// Sizes that agree are one history of that size.
	o = Options{Topics: []TopicPolicy{{Pattern: "a", Persistent: true, ReplayMaxPerTopic: 500}, {Pattern: "b", Persistent: true, ReplayMaxPerTopic: 500}}}
	o = o.withDefaults()
	ps, err = o.Policies()
	if err != nil {
		t.Fatal(err)
	}
	if n, _, _ := replaySize(ps, o.Replay.MaxPerTopic, o.Replay.MaxAge); n != 500 {
		t.Fatalf("history size %d, want 500", n)
	}
}

// TestDataDirLocked: a second server on a data dir in use fails to start,
// and says why.
func TestDataDirLocked(t *testing.T) {
	o := testOptions(t)
	startServer(t, o)
	_, err := New(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "in use by another Fabric instance") {
		t.Fatalf("second server on the same data dir: %v", err)
	}
}

// TestReusePort: two servers share one port with ReusePort, and both answer.
func TestReusePort(t *testing.T) {
	addr := fabrictest.FreeAddr(t)
	names := map[string]bool{}
	for range 2 {
		o := testOptions(t)
		o.Backend = BackendMemory
		o.HTTP.Listen = addr
		o.HTTP.ReusePort = true
		names[startServer(t, o).Name()] = true
	}
	seen := map[string]int{}
	for range 200 {
		tr := &http.Transport{DisableKeepAlives: true}
		resp, err := (&http.Client{Transport: tr}).Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		var h struct{ Instance string }
		_ = json.NewDecoder(resp.Body).Decode(&h)
		resp.Body.Close()
		seen[h.Instance]++
		if len(seen) == 2 {
			break
		}
	}
	if len(seen) != 2 {
		t.Fatalf("only one server answered on the shared port: %v (servers %v)", seen, names)
	}
}

// TestShutdownDrains: Shutdown closes every WebSocket with 1001 and SSE
// stream with its close event, turns /readyz 503 while draining, and Run
// returns.
func TestShutdownDrains(t *testing.T) {
	o := testOptions(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(runCtx) }()
	var clients []*wsclient.Client
	for range 3 {
		c := dial(t, ctx, s, wsclient.Options{})
		if err := c.Subscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	sc, err := wsclient.Dial(ctx, "http://"+s.Addr()+"/events", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if err := sc.Subscribe(ctx, "news"); err != nil {
		t.Fatal(err)
	}
	stop() // as SIGTERM does in fabric serve
	for i, c := range append(clients, sc) {
		if _, err := c.Next(ctx); err != wsclient.ErrClosed {
			t.Fatalf("client %d: %v, want the connection closed", i, err)
		}
		if code, reason := c.CloseCode(); code != 1001 {
			t.Fatalf("client %d got close code %d %q, want 1001 Going Away", i, code, reason)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := s.Run(ctx); err != ErrServerClosed {
		t.Fatalf("Run after a shutdown: %v", err)
	}
	if !s.Draining() {
		t.Fatal("not draining after Run")
	}
	if _, err := http.Get("http://" + s.Addr() + "/healthz"); err == nil {
		t.Fatal("still serving after Run returned")
	}
}

// TestAdminListener: with an admin listener, /metrics and the API move
// there; the main listener keeps the transports and the probes.
func TestAdminListener(t *testing.T) {
	o := testOptions(t)
	o.Backend = BackendMemory
	o.HTTP.AdminListen = "127.0.0.1:0"
	s := startServer(t, o)
	main, admin := "http://"+s.Addr(), "http://"+s.AdminAddr()
	if s.Addr() == s.AdminAddr() {
		t.Fatal("one listener")
	}
	for _, tc := range []struct {
		url    string
		post   bool
		status int
	}{
		{main + "/metrics", false, 404}, {admin + "/metrics", false, 200},
		{main + "/api/publish", true, 404}, {admin + "/api/publish", true, 200},
		{main + "/healthz", false, 200}, {admin + "/healthz", false, 200},
		{main + "/readyz", false, 200}, {admin + "/readyz", false, 200},
		{main + "/ws", false, 426}, {admin + "/ws", false, 404},
	} {
		var status int
		var body string
		if tc.post {
			status, body = post(t, tc.url, `{"topic":"t","event":"e"}`, "")
		} else {
			status, body = get(t, tc.url)
		}
		if status != tc.status {
			t.Errorf("%s: %d %s, want %d", tc.url, status, body, tc.status)
		}
	}
	if err := s.Handle(Route{Pattern: "/api/extra", Handler: http.NotFoundHandler(), Admin: true}); err != nil {
		t.Fatal(err)
	}
	if err := s.Handle(Route{Pattern: "/api/extra", Handler: http.NotFoundHandler(), Admin: true}); err == nil {
		t.Fatal("a route mounted twice")
	}
	if err := s.Handle(Route{Pattern: "GET /x/{a}/z", Handler: http.NotFoundHandler()}); err != nil {
		t.Fatal(err)
	}
	if err := s.Handle(Route{Pattern: "GET /x/y/{b}", Handler: http.NotFoundHandler()}); err == nil {
		t.Fatal("conflicting patterns accepted")
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mod    func(*Options)
		errHas string
	}{
		{"backend", func(o *Options) { o.Backend = "redis" }, `backend "redis"`},
		{"rate by", func(o *Options) { o.RateLimit.By = "moon" }, `rate limit by "moon"`},
		{"presence", func(o *Options) { o.Presence = PresenceOptions{Heartbeat: time.Minute, Expire: time.Second} }, "presence heartbeat"},
		{"ws path", func(o *Options) { o.WebSocket.Path = "ws" }, "websocket path"},
		{"sse path", func(o *Options) { o.SSE.Path = "/ws" }, "sse path"},
		{"memory with NATS", func(o *Options) { o.Backend = BackendMemory; o.NATS.URL = "nats://x" }, "backend memory"},
		{"bad port", func(o *Options) { o.HTTP.Listen = "localhost:99999" }, "listen localhost:99999"},
		{"public without auth", func(o *Options) { o.HTTP.Listen = ":0" }, "protected mode"},
	} {
		o := testOptions(t)
		tc.mod(&o)
		s, err := New(context.Background(), o)
		if err == nil {
			s.Close()
			t.Errorf("%s: started", tc.name)
		} else if !strings.Contains(err.Error(), tc.errHas) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.errHas)
		}
	}
}

// TestDefaults: the zero Options are what the documentation says.
func TestDefaults(t *testing.T) {
	d := Defaults()
	if d.HTTP.Listen != "127.0.0.1:8080" || d.Backend != BackendNATS || d.WebSocket.Path != "/ws" || d.SSE.Path != "/events" ||
		d.Embed.DataDir != "./fabric-data" || d.NATS.SubjectPrefix != "fabric" || d.HTTP.MaxRequests != DefaultMaxRequests {
		t.Fatalf("defaults: %+v", d)
	}
	if !reflect.DeepEqual(d.withDefaults(), d) {
		t.Fatal("withDefaults is not idempotent")
	}
}
