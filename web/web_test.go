package web_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/server"
	"github.com/fabricrt/fabric/web"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

func get(t *testing.T, h http.Handler, path string, header ...string) *http.Response {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, path, nil)
	for i := 0; i+1 < len(header); i += 2 {
		r.Header.Set(header[i], header[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Result()
}

// TestHandlers: the client and the demo are served with their types, an
// ETag that answers 304, and nothing else.
func TestHandlers(t *testing.T) {
	client := web.Client()
	res := get(t, client, "/fabric.js")
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/javascript; charset=utf-8" || !bytes.Equal(body, web.ClientJS()) {
		t.Fatalf("/fabric.js: %d %q, %d bytes", res.StatusCode, res.Header.Get("Content-Type"), len(body))
	}
	if !bytes.Contains(body, []byte("export function connect(")) {
		t.Error("/fabric.js does not export connect")
	}
	etag := res.Header.Get("ETag")
	if etag == "" || res.Header.Get("Cache-Control") != "no-cache" {
		t.Errorf("/fabric.js: ETag %q, Cache-Control %q", etag, res.Header.Get("Cache-Control"))
	}
	if res := get(t, client, "/fabric.js", "If-None-Match", etag); res.StatusCode != http.StatusNotModified {
		t.Errorf("revalidation: %d, want 304", res.StatusCode)
	}
	if res := get(t, client, "/fabric.d.ts"); res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), "application/typescript") {
		t.Errorf("/fabric.d.ts: %d %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	if res := get(t, client, "/other.js"); res.StatusCode != 404 {
		t.Errorf("/other.js: %d", res.StatusCode)
	}

	demo := web.Demo()
	for path, ctype := range map[string]string{
		"/":              "text/html; charset=utf-8",
		"/demo/demo.js":  "text/javascript; charset=utf-8",
		"/demo/demo.css": "text/css; charset=utf-8",
	} {
		if res := get(t, demo, path); res.StatusCode != 200 || res.Header.Get("Content-Type") != ctype {
			t.Errorf("%s: %d %q, want 200 %q", path, res.StatusCode, res.Header.Get("Content-Type"), ctype)
		}
	}
	for _, path := range []string{"/demo/nothing.js", "/index", "/demo/../fabric.js"} {
		if res := get(t, demo, path); res.StatusCode != 404 {
			t.Errorf("%s: %d, want 404", path, res.StatusCode)
		}
	}
	res = get(t, demo, "/")
	page, _ := io.ReadAll(res.Body)
	for _, want := range []string{`src="/demo/demo.js"`, `href="/demo/demo.css"`} {
		if !bytes.Contains(page, []byte(want)) {
			t.Errorf("the demo page lacks %s", want)
		}
	}
}

func startServer(t *testing.T, o server.Options) *server.Server {
	t.Helper()
	o.Backend = server.BackendMemory
	o.HTTP.Listen = "127.0.0.1:0"
	o.Logger = fabrictest.Logger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := server.New(ctx, o)
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

func status(t *testing.T, url string) int {
	t.Helper()
	var res *http.Response
	fabrictest.WaitFor(t, 10*time.Second, "an answer from "+url, func() bool {
		r, err := http.Get(url)
		if err != nil || r.StatusCode == http.StatusServiceUnavailable { // not serving yet
			return false
		}
		res = r
		return true
	})
	res.Body.Close()
	return res.StatusCode
}

// TestServerWiring: every server serves /fabric.js; with Demo it serves the
// page, makes demo:* persistent with presence and client publishes, names
// connections after ?name=, and counts with demo/increment.
func TestServerWiring(t *testing.T) {
	plain := startServer(t, server.Options{})
	base := "http://" + plain.Addr()
	if got := status(t, base+"/fabric.js"); got != 200 {
		t.Fatalf("/fabric.js: %d; server.New must apply withWeb and call mountWeb (server/web.go)", got)
	}
	if got := status(t, base+"/"); got != 404 {
		t.Errorf("/ without demo: %d, want 404", got)
	}

	s := startServer(t, server.Options{Demo: true})
	base = "http://" + s.Addr()
	for _, p := range []string{"/", "/demo/demo.js", "/fabric.js", "/fabric.d.ts"} {
		if got := status(t, base+p); got != 200 {
			t.Errorf("%s with demo: %d", p, got)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws?name="+"%20Ada%0A%20%20Lovelace%22", wsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe(ctx, "__presence:demo:chat"); err != nil {
		t.Fatal(err)
	}
	if err := c.Subscribe(ctx, "demo:chat"); err != nil {
		t.Fatal(err)
	}
	// Presence: this connection, keyed by its cleaned name.
	var join struct {
		Key  string
		Data any
	}
	for {
		ev, err := c.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Topic == "__presence:demo:chat" && ev.Event == "join" {
			if err := json.Unmarshal(ev.Data, &join); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	if join.Key != "Ada Lovelace" {
		t.Errorf("presence key %q, want the cleaned name \"Ada Lovelace\"", join.Key)
	}
	// Client publish on a persistent topic: a seq.
	raw, err := c.Call(ctx, "fabric/publish", "demo:chat", "message", map[string]string{"text": "hi"})
	if err != nil {
		t.Fatal(err)
	}
	var pub struct{ Seq uint64 }
	if json.Unmarshal(raw, &pub) != nil || pub.Seq == 0 {
		t.Errorf("publish to demo:chat: %s, want a seq (persistent)", raw)
	}
	if _, err := c.Call(ctx, "fabric/publish", "other", "message", 1); err == nil {
		t.Error("publish outside demo:* was accepted")
	}
	// The counter.
	for want := 1; want <= 2; want++ {
		raw, err := c.Call(ctx, server.DemoCounterRPC)
		if err != nil {
			t.Fatal(err)
		}
		var v struct{ Value int }
		if json.Unmarshal(raw, &v) != nil || v.Value != want {
			t.Errorf("increment: %s, want %d", raw, want)
		}
	}
	seq, err := s.Node().Seq(ctx, "demo:counter")
	if err != nil || seq == 0 {
		t.Errorf("demo:counter has no history: %d %v", seq, err)
	}

	// An application's own Connect hook wins over the demo's.
	own := startServer(t, server.Options{Demo: true, Hooks: fabric.Hooks{Connect: func(*http.Request) (any, error) {
		return nil, fabric.ErrUnauthorized
	}}})
	if _, err := wsclient.Dial(ctx, "ws://"+own.Addr()+"/ws?name=x", wsclient.Options{}); err == nil {
		t.Error("the application's Connect hook was not used")
	}
}
