package server

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"unicode"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/web"
)

// The browser side (package web): GET /fabric.js and /fabric.d.ts always;
// with Options.Demo the demo page at / (its assets under /demo/), the
// topic policy its chat and counter need, a Connect hook that names
// connections after ?name=, and the counter's RPC.
//
// New applies withWeb right after withDefaults and calls mountWeb right
// after mountBuiltins.

// DemoPolicy is the topic policy Options.Demo puts first: the demo's
// topics keep history (a page that reconnects catches up), have presence
// (who is online) and take client publishes (the chat).
var DemoPolicy = TopicPolicy{Pattern: web.DemoTopic + "*", Persistent: true, Presence: true, ClientPublish: true}

// DemoCounterRPC is the RPC the demo's "+1" button calls: it adds one to
// the counter and publishes the new value on demo:counter.
const DemoCounterRPC = "demo/increment"

// demoCounterTopic carries the counter's values, {"value":N}.
const demoCounterTopic = web.DemoTopic + "counter"

// withWeb returns o with what Options.Demo adds: DemoPolicy before the
// other policies (so that it decides for demo:* topics) and, unless the
// application has its own Connect hook, demoConnect.
func (o Options) withWeb() Options {
	if !o.Demo {
		return o
	}
	o.Topics = append([]TopicPolicy{DemoPolicy}, o.Topics...)
	if o.Hooks.Connect == nil {
		o.Hooks.Connect = demoConnect
	}
	return o
}

// mountWeb mounts the client and, with Options.Demo, the demo page and its
// counter RPC.
func (s *Server) mountWeb() error {
	client := web.Client()
	routes := []Route{
		{Pattern: "GET /fabric.js", Handler: client},
		{Pattern: "GET /fabric.d.ts", Handler: client},
	}
	if s.opts.Demo {
		demo := web.Demo()
		routes = append(routes, Route{Pattern: "GET /{$}", Handler: demo}, Route{Pattern: "GET /demo/", Handler: demo})
		c := &demoCounter{node: s.node}
		s.node.HandleRPC(DemoCounterRPC, c.increment)
		s.log.Info("demo on: open the page at /", "http", s.Addr(), "topics", DemoPolicy.Pattern)
	}
	for _, r := range routes {
		if err := s.Handle(r); err != nil {
			return err
		}
	}
	return nil
}

// demoConnect names a demo connection after ?name= (at most 32
// characters): the user data {"id": name, "name": name}, so that presence
// counts a name's tabs as one member whose key is the name. It is not
// authentication: anyone can claim any name. A request without a name is
// anonymous (a member per connection).
func demoConnect(r *http.Request) (any, error) {
	name := demoName(r.URL.Query().Get("name"))
	if name == "" {
		return nil, nil
	}
	return map[string]any{"id": name, "name": name}, nil
}

// demoName keeps the printable characters of s, spaces collapsed, at most
// 32 of them.
func demoName(s string) string {
	var b strings.Builder
	n := 0
	space := false
	for _, r := range strings.TrimSpace(s) {
		if n == 32 {
			break
		}
		if unicode.IsSpace(r) {
			space = true
			continue
		}
		if !unicode.IsPrint(r) || r == '"' || r == '\\' {
			continue
		}
		if space && n > 0 {
			b.WriteByte(' ')
			n++
		}
		space = false
		b.WriteRune(r)
		n++
	}
	return strings.TrimSpace(b.String())
}

// demoCounter is the demo's counter: one per server, starting from the last
// value in demo:counter's history (so it survives a restart on NATS).
type demoCounter struct {
	node   *fabric.Node
	mu     sync.Mutex
	loaded bool
	n      int64
}

func (c *demoCounter) increment(ctx context.Context, _ *fabric.Call) (any, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.loaded {
		c.n = c.last(ctx)
		c.loaded = true
	}
	seq, err := c.node.Publish(ctx, demoCounterTopic, "value", map[string]int64{"value": c.n + 1})
	if err != nil {
		return nil, err
	}
	c.n++
	return map[string]any{"value": c.n, "seq": seq}, nil
}

// last reads the counter's last published value (0 when none).
func (c *demoCounter) last(ctx context.Context) int64 {
	seq, err := c.node.Seq(ctx, demoCounterTopic)
	if err != nil || seq == 0 {
		return 0
	}
	rng, err := c.node.Since(ctx, demoCounterTopic, seq-1, 1)
	if err != nil || len(rng.Messages) == 0 {
		return 0
	}
	_, _, data, ok := fabric.SplitEnvelope(rng.Messages[0].Envelope)
	if !ok {
		return 0
	}
	var v struct {
		Value int64 `json:"value"`
	}
	if json.Unmarshal(data, &v) != nil {
		return 0
	}
	return v.Value
}
