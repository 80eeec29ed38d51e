package web_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/server"
)

// The browser harness: browser/harness.mjs with its locked playwright-core.
const harnessDir = "browser"

// chromiumPath is Debian's Chromium (apt-get install chromium); never a
// downloaded browser build.
const chromiumPath = "/usr/bin/chromium"

// harnessTimeout bounds the whole browser run (about 30 s on the 2-core
// development machine).
const harnessTimeout = 120 * time.Second

// TestBrowser runs the demo page in Debian's headless Chromium, driven by
// playwright-core from Node, against real servers:
//
//   - two pages chat through the page's UI; presence shows both by name;
//     the live counter follows clicks on the other page; a screenshot is
//     saved (the artifact dir: $FABRIC_ARTIFACTS, else a temp dir, logged);
//   - a third page behind a proxy that refuses WebSocket upgrades falls
//     back to SSE and chats both ways;
//   - the network of two pages (one WebSocket, one SSE) is cut while
//     messages are published: they appear once each, in order;
//   - the server (embedded NATS, history on disk) restarts on the same
//     data dir and port; messages are published on the new server before
//     any page can reconnect: every page shows them once each;
//   - a page's network is cut while the server restarts and messages are
//     published: they appear once each when the network is back;
//   - a page whose getToken fetches tokens from a server with a Connect
//     hook reading ?token=: the server asks for a refresh, takes one,
//     denies the next, closes with 4401 at expiry; the page gets a new
//     token and reconnects.
func TestBrowser(t *testing.T) {
	t.Parallel()
	chromium := findChromium(t)
	node := findNode(t)
	modules := npmModules(t, harnessDir)
	run := t.TempDir()
	copyFile(t, filepath.Join(harnessDir, "harness.mjs"), filepath.Join(run, "harness.mjs"))
	if err := os.Symlink(modules, filepath.Join(run, "node_modules")); err != nil {
		t.Fatal(err)
	}
	artifacts := artifactDir(t)

	demo := startDemo(t)
	proxy := startProxy(t, demo.addr)
	tokens := startTokenServer(t)
	readme := startReadmeServer(t)

	cfg, _ := json.Marshal(map[string]string{
		"base":       "http://" + demo.addr,
		"proxy":      proxy,
		"tokenBase":  tokens.base,
		"readmeBase": readme,
		"chromium":   chromium,
		"artifacts":  artifacts,
	})
	ctx, cancel := context.WithTimeout(context.Background(), harnessTimeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, node, "harness.mjs", string(cfg))
	cmd.Dir = run
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}

	steps := map[string]json.RawMessage{}
	var order []string
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := append([]byte(nil), sc.Bytes()...)
		var s struct {
			Step  string   `json:"step"`
			ID    int      `json:"id"`
			Need  string   `json:"need"`
			Texts []string `json:"texts"`
			Gate  bool     `json:"gate"`
		}
		if err := json.Unmarshal(line, &s); err != nil || s.Step == "" {
			t.Errorf("harness printed a non-step line: %s", line)
			continue
		}
		t.Logf("%6.1fs harness: %s", time.Since(start).Seconds(), clip(line))
		order = append(order, s.Step)
		switch s.Step {
		case "error":
			t.Errorf("harness failed: %s", line)
		case "need":
			switch s.Need {
			case "publish":
				demo.publish(t, s.Texts)
			case "restart":
				demo.restart(t, s.Gate, s.Texts)
			case "deny-refresh":
				tokens.denyRefresh.Store(true)
			default:
				t.Errorf("harness asked for %q", s.Need)
			}
			fmt.Fprintf(stdin, "{\"id\":%d}\n", s.ID)
			continue
		}
		steps[s.Step] = line
	}
	waitErr := cmd.Wait()
	elapsed := time.Since(start)
	if ctx.Err() != nil {
		t.Fatalf("harness timed out after %s; steps %v; stderr:\n%s", harnessTimeout, order, stderr.String())
	}
	if waitErr != nil || sc.Err() != nil {
		t.Fatalf("harness: %v (scan: %v); steps %v; stderr:\n%s", waitErr, sc.Err(), order, stderr.String())
	}
	if stderr.Len() > 0 {
		t.Logf("harness stderr:\n%s", stderr.String())
	}
	t.Logf("browser run: %s (Chromium %s)", elapsed.Round(100*time.Millisecond), chromium)

	// Both pages connected over WebSocket.
	expect(t, steps, "open", `{"step":"open","a":{"status":"open","transport":"websocket"},"b":{"status":"open","transport":"websocket"}}`)

	// Presence: each page lists both, by the name the server gave them
	// (the demo keys members by ?name=).
	var pres struct {
		A, B  []struct{ Key, Name string }
		AList []string
	}
	decode(t, steps, "presence", &pres)
	for page, members := range map[string][]struct{ Key, Name string }{"a": pres.A, "b": pres.B} {
		var names []string
		for _, m := range members {
			names = append(names, m.Key+"="+m.Name)
		}
		if !reflect.DeepEqual(sorted(names), []string{"Alice=Alice", "Bob=Bob"}) {
			t.Errorf("page %s's presence: %v, want Alice and Bob", page, names)
		}
	}
	if strings.Join(pres.AList, "|") != "AAlice(you)|BBob" {
		t.Errorf("Alice's online list reads %q", pres.AList)
	}

	// The chat: every message on both pages, once, in order.
	once := `{"counts":[1,1,1,1],"inOrder":true}`
	expect(t, steps, "chat", `{"step":"chat","a":`+once+`,"b":`+once+`}`)
	expect(t, steps, "counter", `{"step":"counter","a":3,"b":3}`)
	var shot struct{ Path string }
	decode(t, steps, "screenshot", &shot)
	if st, err := os.Stat(shot.Path); err != nil || st.Size() < 10_000 {
		t.Errorf("screenshot %s: %v", shot.Path, err)
	} else {
		t.Logf("screenshot of the demo: %s", shot.Path)
	}

	// SSE: the page behind the WebSocket-refusing proxy.
	var sse struct {
		C            struct{ Status, Transport string }
		Remembered   []string
		CSees, ASees occurrence
	}
	decode(t, steps, "sse", &sse)
	if sse.C.Status != "open" || sse.C.Transport != "sse" || len(sse.Remembered) != 1 {
		t.Errorf("the proxied page: %+v, remembered %v; want open over sse, remembered", sse.C, sse.Remembered)
	}
	sse.CSees.once(t, "Carol sees Alice's message")
	sse.ASees.once(t, "Alice sees Carol's message")

	// The network cut: every page has the 5 messages once, in order; the
	// cut pages got them through a resume that recovered everything.
	var cut struct {
		A, B, C            occurrence
		BResumes, CResumes []struct {
			Recovered bool
			Replayed  int
		}
	}
	decode(t, steps, "cut", &cut)
	cut.A.once(t, "cut: Alice (online)")
	cut.B.once(t, "cut: Bob (WebSocket)")
	cut.C.once(t, "cut: Carol (SSE)")
	for who, rs := range map[string][]struct {
		Recovered bool
		Replayed  int
	}{"Bob": cut.BResumes, "Carol": cut.CResumes} {
		if len(rs) == 0 || !rs[len(rs)-1].Recovered || rs[len(rs)-1].Replayed != 5 {
			t.Errorf("%s's resumes of demo:chat: %+v; want the last one recovered with the 5 missed messages", who, rs)
		}
	}

	// The restart: the messages published before any page could reconnect.
	var restart struct {
		Ms      int
		A, B, C occurrence
		Closes  map[string][]*int
	}
	decode(t, steps, "restart", &restart)
	restart.A.once(t, "restart: Alice")
	restart.B.once(t, "restart: Bob")
	restart.C.once(t, "restart: Carol (SSE)")
	for who, codes := range restart.Closes {
		if !containsCode(codes, 1001) {
			t.Errorf("page %s's closes %v: no 1001 from the restart", who, derefs(codes))
		}
	}
	t.Logf("restart: every page caught up %d ms after the server began to stop", restart.Ms)
	var both struct{ A, B, C occurrence }
	decode(t, steps, "restart-cut", &both)
	both.A.once(t, "cut + restart: Alice")
	both.B.once(t, "cut + restart: Bob (cut)")
	both.C.once(t, "cut + restart: Carol (SSE)")

	// Nothing anywhere twice; every page open on its transport.
	var final struct {
		Pages map[string]struct {
			Occurrences  occurrence
			Duplicates   int
			ReloadBanner bool
			Status       struct{ Status, Transport string }
		}
	}
	decode(t, steps, "final", &final)
	for who, p := range final.Pages {
		p.Occurrences.once(t, "every message on page "+who)
		want := "websocket"
		if who == "c" {
			want = "sse"
		}
		if p.Duplicates != 0 || p.ReloadBanner || p.Status.Status != "open" || p.Status.Transport != want {
			t.Errorf("page %s: %d duplicates dropped, reload banner shown %v, %+v; want none, no banner, open over %s",
				who, p.Duplicates, p.ReloadBanner, p.Status, want)
		}
	}

	// Tokens: refreshed once, refused once, 4401, a new token, reconnected.
	var tok struct {
		Events []struct {
			Type        string
			Code        int
			Reconnected bool
			Exp         int64
		}
	}
	decode(t, steps, "token", &tok)
	var seen []string
	for _, e := range tok.Events {
		switch e.Type {
		case "open":
			seen = append(seen, "open reconnected="+strconv.FormatBool(e.Reconnected))
		case "close", "error":
			seen = append(seen, e.Type+" "+strconv.Itoa(e.Code))
		default:
			seen = append(seen, e.Type)
		}
	}
	t.Logf("token page events: %v", seen)
	connects, refreshes := tokens.log()
	t.Logf("token server: connects %v, refreshes %v", connects, refreshes)
	if !containsInOrder(seen, "open reconnected=false", "refreshed", "close 4401", "open reconnected=true") {
		t.Errorf("token page events %v; want an open, a refresh, a 4401 close, a reconnection", seen)
	}
	if len(connects) < 2 || connects[0] == connects[len(connects)-1] {
		t.Errorf("connect tokens %v: want a new token after the 4401", connects)
	}
	// Accepted refreshes (one, or more when the harness was slow to ask for
	// the denial), then exactly one denied: no retry loop after it.
	denied := 0
	for _, r := range refreshes {
		if strings.HasSuffix(r, " denied") {
			denied++
		}
	}
	if len(refreshes) < 2 || !strings.HasSuffix(refreshes[0], " ok") || denied != 1 || !strings.HasSuffix(refreshes[len(refreshes)-1], " denied") {
		t.Errorf("refreshes %v: want accepted ones, then one denied (and no retry loop)", refreshes)
	}

	// The README's example, as written.
	expect(t, steps, "readme", `{"step":"readme","title":"open","items":["Hello from the README"]}`)

	expect(t, steps, "pageErrors", `{"step":"pageErrors","errors":[]}`)
	if _, ok := steps["done"]; !ok {
		t.Errorf("the harness did not finish: steps %v", order)
	}
}

// findChromium returns Debian's Chromium: $FABRIC_CHROMIUM, else
// /usr/bin/chromium, installing it with apt-get when it is missing and the
// test runs as root. Elsewhere it says what to install (a failure under
// CI=true, a skip otherwise).
func findChromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("FABRIC_CHROMIUM"); p != "" {
		return p
	}
	if _, err := os.Stat(chromiumPath); err == nil {
		return chromiumPath
	}
	const need = "the browser tests need Debian's Chromium at " + chromiumPath + ": run `apt-get install -y chromium` as root (or set FABRIC_CHROMIUM to a Chromium binary)"
	if os.Geteuid() != 0 {
		needTool(t, "%s", need)
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		needTool(t, "%s (no apt-get here)", need)
	}
	install := func(args ...string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	t.Logf("%s is missing: apt-get install -y chromium", chromiumPath)
	out, err := install("install", "-y", "chromium")
	if err != nil { // the package lists may be missing or stale
		if o, uerr := install("update"); uerr != nil {
			needTool(t, "%s; apt-get update failed: %v\n%s", need, uerr, o)
		}
		out, err = install("install", "-y", "chromium")
	}
	if err != nil {
		needTool(t, "%s; apt-get install -y chromium failed: %v\n%s", need, err, tail(out))
	}
	if _, err := os.Stat(chromiumPath); err != nil {
		needTool(t, "%s; apt-get installed chromium but %s is missing", need, chromiumPath)
	}
	return chromiumPath
}

// artifactDir is where the screenshot goes: $FABRIC_ARTIFACTS (kept), else
// a directory under the system temp dir that outlives the test (logged).
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("FABRIC_ARTIFACTS")
	if dir == "" {
		d, err := os.MkdirTemp("", "fabric-browser-artifacts-")
		if err != nil {
			t.Fatal(err)
		}
		dir = d
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("artifacts: %s", abs)
	return abs
}

// demoServer is `fabric serve --demo` on embedded NATS (history on disk),
// restartable on the same data dir and port. Its Connect hook names
// connections after ?name= as the demo's does, and holds them while the
// gate is closed.
type demoServer struct {
	t    *testing.T
	addr string
	opts server.Options

	mu   sync.Mutex
	srv  *server.Server
	done chan error
	gate chan struct{} // closed: connections pass
}

func startDemo(t *testing.T) *demoServer {
	d := &demoServer{t: t, gate: make(chan struct{})}
	close(d.gate)
	d.opts = server.Options{
		Demo:            true,
		HTTP:            server.HTTPOptions{Listen: "127.0.0.1:0"},
		Embed:           server.EmbedOptions{DataDir: t.TempDir()},
		NATS:            server.NATSOptions{SubjectPrefix: fabrictest.TestPrefix(t)},
		Logger:          fabrictest.Logger(t),
		ShutdownTimeout: 10 * time.Second,
		Hooks:           fabric.Hooks{Connect: d.connect},
	}
	d.start(t)
	d.addr = d.srv.Addr()
	d.opts.HTTP.Listen = d.addr
	t.Cleanup(func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = d.srv.Shutdown(ctx)
		if err := <-d.done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return d
}

func (d *demoServer) connect(r *http.Request) (any, error) {
	d.mu.Lock()
	gate := d.gate
	d.mu.Unlock()
	select {
	case <-gate:
	case <-r.Context().Done():
		return nil, r.Context().Err()
	}
	if name := r.URL.Query().Get("name"); name != "" {
		return map[string]any{"id": name, "name": name}, nil
	}
	return nil, nil
}

func (d *demoServer) start(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv, err := server.New(ctx, d.opts)
	if err != nil {
		t.Fatalf("start the demo server: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(context.Background()) }()
	d.mu.Lock()
	d.srv, d.done = srv, done
	d.mu.Unlock()
	// /fabric.js answers once the server serves.
	fabrictest.WaitFor(t, 10*time.Second, "the demo server serving /fabric.js (server.New must call mountWeb: server/web.go)", func() bool {
		res, err := http.Get("http://" + srv.Addr() + "/fabric.js")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
}

// publish publishes texts to demo:chat as the server would, in order.
func (d *demoServer) publish(t *testing.T, texts []string) {
	d.mu.Lock()
	srv := d.srv
	d.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, text := range texts {
		if _, err := srv.Node().Publish(ctx, "demo:chat", "message", map[string]any{"name": "Server", "text": text, "at": time.Now().UnixMilli()}); err != nil {
			t.Errorf("publish %q: %v", text, err)
		}
	}
}

// restart stops the server (1001 to every page) and starts it again on
// the same data dir and port; with gate, connections wait until texts are
// published on the new server.
func (d *demoServer) restart(t *testing.T, gate bool, texts []string) {
	d.mu.Lock()
	old, done := d.srv, d.done
	if gate {
		d.gate = make(chan struct{})
	}
	d.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := old.Shutdown(ctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	d.start(t)
	d.publish(t, texts)
	d.mu.Lock()
	select {
	case <-d.gate:
	default:
		close(d.gate)
	}
	d.mu.Unlock()
}

// startProxy starts a reverse proxy to addr that refuses WebSocket
// upgrades, as some corporate proxies do; SSE passes (and streams).
func startProxy(t *testing.T, addr string) string {
	target := &url.URL{Scheme: "http", Host: addr}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // the origin check compares Origin with Host
		},
		ErrorLog: log.New(io.Discard, "", 0), // streams cut by the restarts
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			http.Error(w, "WebSockets are blocked here", http.StatusForbidden)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "http://" + ln.Addr().String()
}

// tokenServer is a server whose Connect hook reads ?token= (tokens it
// issued at GET /test/token, each valid 3 s) and whose Refresh hook takes
// new ones until denyRefresh is set; /token.html is a page that connects
// with getToken.
type tokenServer struct {
	base        string
	denyRefresh atomic.Bool

	mu        sync.Mutex
	issued    map[string]bool
	n         int
	connects  []string
	refreshes []string
}

// tokenLife is how long a token is valid: the server asks for a refresh
// at half of it and closes with 4401 at its end.
const tokenLife = 3 * time.Second

// tokenUser is a connection's user data: it expires (fabric.Expirer).
type tokenUser struct {
	ID  string
	exp time.Time
}

func (u *tokenUser) ExpiresAt() time.Time { return u.exp }

const tokenPage = `<!doctype html><meta charset="utf-8"><title>token</title>
<script type="module">
import { connect } from '/fabric.js';
window.events = [];
const client = connect({ getToken: () => fetch('/test/token').then((r) => r.text()) });
client.on('open', (e) => events.push({ type: 'open', reconnected: e.reconnected }));
client.on('close', (e) => events.push({ type: 'close', code: e.code ?? 0 }));
client.on('refreshed', (e) => events.push({ type: 'refreshed', exp: e.exp }));
client.on('error', (e) => events.push({ type: 'error', code: 0, message: e.code }));
window.client = client;
</script>`

func startTokenServer(t *testing.T) *tokenServer {
	ts := &tokenServer{issued: map[string]bool{}}
	user := func(token string) (any, error) {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		if !ts.issued[token] {
			return nil, fabric.ErrUnauthorized
		}
		return &tokenUser{ID: "dana", exp: time.Now().Add(tokenLife)}, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /test/token", func(w http.ResponseWriter, _ *http.Request) {
		ts.mu.Lock()
		ts.n++
		tok := "t" + strconv.Itoa(ts.n)
		ts.issued[tok] = true
		ts.mu.Unlock()
		_, _ = io.WriteString(w, tok)
	})
	mux.HandleFunc("GET /token.html", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, tokenPage)
	})
	srv, err := server.New(context.Background(), server.Options{
		Backend: server.BackendMemory,
		HTTP:    server.HTTPOptions{Listen: "127.0.0.1:0"},
		Logger:  fabrictest.Logger(t),
		Routes:  []server.Route{{Pattern: "/test/", Handler: mux}, {Pattern: "/token.html", Handler: mux}},
		Hooks: fabric.Hooks{
			Connect: func(r *http.Request) (any, error) {
				tok := r.URL.Query().Get("token")
				ts.mu.Lock()
				ts.connects = append(ts.connects, tok)
				ts.mu.Unlock()
				return user(tok)
			},
			Refresh: func(_ *fabric.Client, tok string) (any, error) {
				if ts.denyRefresh.Load() {
					ts.record(tok + " denied")
					return nil, fabric.NewLiveError(fabric.CodeForbidden, "refresh denied by the test")
				}
				ud, err := user(tok)
				if err != nil {
					ts.record(tok + " unknown")
					return nil, err
				}
				ts.record(tok + " ok")
				return ud, nil
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; err != nil {
			t.Errorf("token server: %v", err)
		}
	})
	ts.base = "http://" + srv.Addr()
	return ts
}

func (ts *tokenServer) record(s string) {
	ts.mu.Lock()
	ts.refreshes = append(ts.refreshes, s)
	ts.mu.Unlock()
}

func (ts *tokenServer) log() (connects, refreshes []string) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]string(nil), ts.connects...), append([]string(nil), ts.refreshes...)
}

// startReadmeServer serves the README's example page at /readme.html from a
// server run as the README says (--replay 'chat:*' --client-publish
// 'chat:*').
func startReadmeServer(t *testing.T) string {
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)<!-- readme-example:begin[^>]*-->\n```html\n(.*?)```\n<!-- readme-example:end -->").FindSubmatch(raw)
	if m == nil {
		t.Fatal("README.md has no readme-example block")
	}
	page := m[1]
	srv, err := server.New(context.Background(), server.Options{
		Backend:       server.BackendMemory,
		HTTP:          server.HTTPOptions{Listen: "127.0.0.1:0"},
		Logger:        fabrictest.Logger(t),
		Replay:        server.ReplayOptions{Topics: []string{"chat:*"}},
		ClientPublish: []string{"chat:*"},
		Routes: []server.Route{{Pattern: "GET /readme.html", Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			_, _ = w.Write(page)
		})}},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; err != nil {
			t.Errorf("readme server: %v", err)
		}
	})
	return "http://" + srv.Addr()
}

// occurrence is what the harness reports for a list of texts on a page:
// how often each appears, and whether in order.
type occurrence struct {
	Counts  []int
	InOrder bool
}

func (o occurrence) once(t *testing.T, what string) {
	t.Helper()
	ok := o.InOrder && len(o.Counts) > 0
	for _, n := range o.Counts {
		ok = ok && n == 1
	}
	if !ok {
		t.Errorf("%s: counts %v, in order %v; want each message exactly once, in order", what, o.Counts, o.InOrder)
	}
}

// expect compares the step's JSON with want, as JSON values.
func expect(t *testing.T, steps map[string]json.RawMessage, step, want string) {
	t.Helper()
	got, ok := steps[step]
	if !ok {
		t.Errorf("harness never reported step %q", step)
		return
	}
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Errorf("step %q: %v", step, err)
		return
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("step %q: bad expectation: %v", step, err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("step %q:\n got %s\nwant %s", step, got, want)
	}
}

func decode(t *testing.T, steps map[string]json.RawMessage, step string, v any) {
	t.Helper()
	raw, ok := steps[step]
	if !ok {
		t.Errorf("harness never reported step %q", step)
		return
	}
	if err := json.Unmarshal(raw, v); err != nil {
		t.Errorf("step %q: %v", step, err)
	}
}

func containsInOrder(have []string, want ...string) bool {
	i := 0
	for _, h := range have {
		if i < len(want) && h == want[i] {
			i++
		}
	}
	return i == len(want)
}

func containsCode(codes []*int, want int) bool {
	for _, c := range codes {
		if c != nil && *c == want {
			return true
		}
	}
	return false
}

func derefs(codes []*int) []int {
	out := make([]int, 0, len(codes))
	for _, c := range codes {
		if c == nil {
			out = append(out, 0)
		} else {
			out = append(out, *c)
		}
	}
	return out
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func clip(b []byte) string {
	if len(b) > 600 {
		return string(b[:600]) + "…"
	}
	return string(b)
}

func tail(b []byte) string {
	if len(b) > 2000 {
		return "…" + string(b[len(b)-2000:])
	}
	return string(b)
}
