package fabrictest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// Dialer connects a client to an instance over one transport.
type Dialer func(inst *Instance, opts wsclient.Options) *wsclient.Client

// RunSessionCases runs the session protocol's cases over one transport:
// every transport passes the same table (wsedge and sse both call it).
func RunSessionCases(t *testing.T, dial Dialer) {
	for _, c := range sessionCases {
		t.Run(c.name, func(t *testing.T) { c.run(t, dial) })
	}
}

type sessionCase struct {
	name string
	run  func(t *testing.T, dial Dialer)
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// userHooks authenticate each connection as its X-User header.
func userHooks() fabric.Hooks {
	return fabric.Hooks{Connect: func(r *http.Request) (any, error) {
		if u := r.Header.Get("X-User"); u != "" {
			return u, nil
		}
		return nil, nil
	}}
}

func asUser(u string) wsclient.Options {
	return wsclient.Options{Header: http.Header{"X-User": {u}}}
}

// next returns the next envelope on topic, skipping others.
func next(t *testing.T, ctx context.Context, c *wsclient.Client, topic string) wsclient.Envelope {
	t.Helper()
	for {
		e, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for a message on %s: %v", topic, err)
		}
		if e.Topic == topic {
			return e
		}
	}
}

var sessionCases = []sessionCase{
	{"SubscribeAndDeliver", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{})
		ctx := ctxFor(t, 20*time.Second)
		c := dial(inst, wsclient.Options{})
		if err := c.Subscribe(ctx, "chat:1"); err != nil {
			t.Fatal(err)
		}
		if _, err := inst.Node.Publish(ctx, "chat:1", "created", map[string]any{"text": "hi\nthere"}); err != nil {
			t.Fatal(err)
		}
		e := next(t, ctx, c, "chat:1")
		if e.Event != "created" || string(e.Data) != `{"text":"hi\nthere"}` {
			t.Fatalf("got %+v", e)
		}
	}},
	{"SubscribeRefused", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{Node: fabric.Config{Hooks: fabric.Hooks{Subscribe: func(_ *fabric.Client, topic string) error {
			switch {
			case strings.HasPrefix(topic, "admin:"):
				return errors.New("admins only")
			case strings.HasPrefix(topic, "vip:"):
				return fabric.NewLiveError(fabric.CodeUnauthenticated, "log in")
			}
			return nil
		}}}})
		ctx := ctxFor(t, 20*time.Second)
		c := dial(inst, wsclient.Options{})
		for topic, want := range map[string]string{"admin:1": fabric.CodeForbidden, "vip:1": fabric.CodeUnauthenticated,
			"tab\there": fabric.CodeInvalidTopic, strings.Repeat("x", 257): fabric.CodeInvalidTopic} {
			var de *wsclient.DeniedError
			if err := c.Subscribe(ctx, topic); !errors.As(err, &de) || de.Reason != want {
				t.Errorf("subscribe %.20q: %v, want denied %s", topic, err, want)
			}
		}
		if err := c.Subscribe(ctx, "__rpc"); err != nil {
			t.Fatalf("__rpc (subscribed by svelte-realtime) refused: %v", err)
		}
	}},
	{"Unsubscribe", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{})
		ctx := ctxFor(t, 20*time.Second)
		c := dial(inst, wsclient.Options{})
		if err := c.Subscribe(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		if n := inst.Node.Subscribers("a"); n != 1 {
			t.Fatalf("%d subscribers after subscribe", n)
		}
		if err := c.Unsubscribe(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		if n := inst.Node.Subscribers("a"); n != 0 {
			t.Fatalf("%d subscribers after the unsubscribe was acknowledged", n)
		}
	}},
	{"RPC", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{})
		inst.Node.HandleRPC("math/add", func(_ context.Context, call *fabric.Call) (any, error) {
			var a, b int
			if err := call.Arg(0, &a); err != nil {
				return nil, err
			}
			if err := call.Arg(1, &b); err != nil {
				return nil, err
			}
			return a + b, nil
		})
		inst.Node.HandleRPC("math/boom", func(context.Context, *fabric.Call) (any, error) {
			return nil, errors.New("secret internals")
		})
		ctx := ctxFor(t, 20*time.Second)
		c := dial(inst, wsclient.Options{})
		if res, err := c.Call(ctx, "math/add", 2, 3); err != nil || string(res) != "5" {
			t.Fatalf("math/add = %s, %v", res, err)
		}
		for path, want := range map[string]string{"math/nope": fabric.CodeNotFound, "math/boom": fabric.CodeInternal} {
			var re *wsclient.RPCError
			if _, err := c.Call(ctx, path); !errors.As(err, &re) || re.Code != want {
				t.Errorf("%s: %v, want %s", path, err, want)
			}
			if re != nil && strings.Contains(re.Message, "secret") {
				t.Errorf("%s leaked its error: %s", path, re.Message)
			}
		}
		var re *wsclient.RPCError
		if _, err := c.Call(ctx, "math/add", "x"); !errors.As(err, &re) || re.Code != fabric.CodeValidation {
			t.Errorf("bad argument: %v, want VALIDATION", err)
		}
	}},
	{"ClientPublish", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{Node: fabric.Config{Hooks: fabric.Hooks{Publish: func(_ *fabric.Client, topic, _ string) error {
			if strings.HasPrefix(topic, "chat:") {
				return nil
			}
			return errors.New("no")
		}}}})
		ctx := ctxFor(t, 20*time.Second)
		sub, pub := dial(inst, wsclient.Options{}), dial(inst, wsclient.Options{})
		if err := sub.Subscribe(ctx, "chat:1"); err != nil {
			t.Fatal(err)
		}
		if res, err := pub.Call(ctx, fabric.PublishRPCPath, "chat:1", "said", "hello"); err != nil || string(res) != `{"seq":0}` {
			t.Fatalf("publish: %s, %v", res, err)
		}
		if e := next(t, ctx, sub, "chat:1"); e.Event != "said" || string(e.Data) != `"hello"` {
			t.Fatalf("got %+v", e)
		}
		var re *wsclient.RPCError
		if _, err := pub.Call(ctx, fabric.PublishRPCPath, "other", "said", 1); !errors.As(err, &re) || re.Code != fabric.CodeForbidden {
			t.Fatalf("publish elsewhere: %v, want FORBIDDEN", err)
		}
	}},
	{"ResumeAndReplay", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{
			Node: fabric.Config{Persistent: fabric.MatchTopics([]string{"log:*"})},
			History: func(i *Instance) (fabric.History, error) {
				return newHistory(i)
			},
		})
		ctx := ctxFor(t, 30*time.Second)
		var seqs []uint64
		for i := range 5 {
			seq, err := inst.Node.Publish(ctx, "log:1", "n", i)
			if err != nil {
				t.Fatal(err)
			}
			seqs = append(seqs, seq)
		}
		c := dial(inst, wsclient.Options{})
		if err := c.SubscribeSince(ctx, "log:1", seqs[1]); err != nil {
			t.Fatal(err)
		}
		for _, want := range seqs[2:] {
			if e := next(t, ctx, c, "log:1"); e.Seq != want {
				t.Fatalf("resume sent seq %d, want %d", e.Seq, want)
			}
		}
		end := next(t, ctx, c, fabric.ReplayTopicPrefix+"log:1")
		var res fabric.ResumeResult
		if err := json.Unmarshal(end.Data, &res); err != nil || !res.Recovered || res.Seq != seqs[4] || res.Epoch == "" {
			t.Fatalf("end %s, want recovered at %d with an epoch", end.Data, seqs[4])
		}
		live, err := inst.Node.Publish(ctx, "log:1", "n", 5)
		if err != nil {
			t.Fatal(err)
		}
		if e := next(t, ctx, c, "log:1"); e.Seq != live {
			t.Fatalf("after the end: seq %d, want the live %d", e.Seq, live)
		}
		// The npm replay plugin's request.
		r := dial(inst, wsclient.Options{})
		if err := r.Replay("log:1", seqs[3]); err != nil {
			t.Fatal(err)
		}
		msg := next(t, ctx, r, fabric.ReplayTopicPrefix+"log:1")
		var d struct{ Seq uint64 }
		if err := json.Unmarshal(msg.Data, &d); err != nil || msg.Event != "msg" || d.Seq != seqs[4] {
			t.Fatalf("replay sent %+v, want msg %d", msg, seqs[4])
		}
	}},
	{"Presence", func(t *testing.T, dial Dialer) {
		inst := NewInstance(t, Options{Node: fabric.Config{Hooks: userHooks()}})
		p := StartPresence(t, inst, fabric.PresenceOptions{Topics: fabric.MatchTopics([]string{"room:*"})})
		ctx := ctxFor(t, 20*time.Second)
		obs := dial(inst, wsclient.Options{})
		if err := obs.Subscribe(ctx, fabric.PresenceTopicPrefix+"room:1"); err != nil {
			t.Fatal(err)
		}
		if e := next(t, ctx, obs, fabric.PresenceTopicPrefix+"room:1"); e.Event != "list" || string(e.Data) != "[]" {
			t.Fatalf("first presence event %+v, want an empty list", e)
		}
		ada := dial(inst, asUser("ada"))
		if err := ada.Subscribe(ctx, "room:1"); err != nil {
			t.Fatal(err)
		}
		if e := next(t, ctx, obs, fabric.PresenceTopicPrefix+"room:1"); e.Event != "join" || !strings.Contains(string(e.Data), `"key":"ada"`) {
			t.Fatalf("got %+v, want ada's join", e)
		}
		if n, _ := p.Count(ctx, "room:1"); n != 1 {
			t.Fatalf("Count = %d", n)
		}
	}},
	{"HooksAndClose", func(t *testing.T, dial Dialer) {
		var mu sync.Mutex
		var got []string
		var closed = make(chan int, 1)
		cfg := fabric.Config{Hooks: userHooks()}
		cfg.Hooks.Message = func(c *fabric.Client, data []byte, _ bool) {
			mu.Lock()
			got = append(got, fmt.Sprintf("%v:%s", c.UserData(), data))
			mu.Unlock()
		}
		cfg.Hooks.Disconnect = func(_ *fabric.Client, code int, _ string) { closed <- code }
		inst := NewInstance(t, Options{Node: cfg})
		c := dial(inst, asUser("bob"))
		if err := c.SendRaw([]byte(`{"custom":1}`)); err != nil {
			t.Fatal(err)
		}
		WaitFor(t, 5*time.Second, "the Message hook", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) == 1 && got[0] == `bob:{"custom":1}`
		})
		inst.Node.Each(func(cl *fabric.Client) bool { cl.Close(4000, "bye"); return true })
		select {
		case code := <-closed:
			if code != 4000 {
				t.Fatalf("Disconnect hook got %d, want 4000", code)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no Disconnect hook after the server closed the connection")
		}
		WaitFor(t, 5*time.Second, "the client to see the close", func() bool {
			code, reason := c.CloseCode()
			return code == 4000 && reason == "bye"
		})
	}},
}

// newHistory is the instance's NATS history (created at once).
func newHistory(i *Instance) (fabric.History, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return fjs.NewHistory(ctx, i.JS, fjs.HistoryOptions{Prefix: i.Broker.Prefix(), Eager: true})
}

// StartPresence runs presence for the instance on a NATS presence store
// (short heartbeats, for tests); both stop at cleanup.
func StartPresence(t testing.TB, inst *Instance, opts fabric.PresenceOptions) *fabric.Presence {
	t.Helper()
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval, opts.ExpireAfter = 200*time.Millisecond, time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := fjs.NewPresenceStore(ctx, inst.JS, fjs.PresenceStoreOptions{Prefix: inst.Broker.Prefix(),
		KeepAlive: opts.HeartbeatInterval, MarkerTTL: opts.ExpireAfter, Logger: Logger(t)})
	if err != nil {
		t.Fatalf("fabrictest: presence store: %v", err)
	}
	p, err := fabric.NewPresence(ctx, inst.Node, store, opts)
	if err != nil {
		store.Close()
		t.Fatalf("fabrictest: presence: %v", err)
	}
	t.Cleanup(func() { p.Close(); store.Close() })
	return p
}
