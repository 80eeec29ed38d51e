package auth_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/server"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/golang-jwt/jwt/v5"
)

// startServer runs a memory-backend server on a free loopback port until
// the test ends, and waits until it serves.
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
	fabrictest.WaitFor(t, 10*time.Second, "the server to serve", func() bool { return s.Ready(context.Background()) == nil })
	return s
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// dialAs connects to s's WebSocket endpoint with token as a Bearer token.
func dialAs(t *testing.T, s *server.Server, token string) *wsclient.Client {
	t.Helper()
	h := http.Header{}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	return dialURL(t, "ws://"+s.Addr()+"/ws", wsclient.Options{Header: h})
}

func dialURL(t *testing.T, u string, o wsclient.Options) *wsclient.Client {
	t.Helper()
	c, err := wsclient.Dial(ctxFor(t), u, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// upgrade sends a WebSocket upgrade request to s and returns the refusal's
// status and body (101 when it was accepted).
func upgrade(t *testing.T, s *server.Server, rawQuery string, h http.Header) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+s.Addr()+"/ws?"+rawQuery, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return resp.StatusCode, "" // the body is the WebSocket: closed unread
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// chatToken is Ada's (or another user's) token: rooms and chat to read,
// chat to publish, chat RPCs.
func chatToken(t *testing.T, sub string, ttl time.Duration) string {
	return hs(t, claims(sub, ttl, map[string]any{
		"subscribe": []string{"room:lobby", "chat:*"},
		"publish":   []string{"chat:*"},
		"rpc":       []string{"chat/*", "whoami/*"},
		"info":      map[string]any{"name": strings.ToUpper(sub[:1]) + sub[1:]},
	}))
}

func whoami(ctx context.Context, call *fabric.Call) (any, error) {
	k, _ := fabric.UserKey(call.Client.UserData())
	return k, nil
}

// TestConnect: over a real server, a connection needs a valid token, from
// the Authorization header, the token query parameter or the cookie (on
// WebSocket and SSE); refusals are 401 with a short reason and never the
// token.
func TestConnect(t *testing.T) {
	s := startServer(t, server.Options{Auth: server.AuthOptions{Secrets: []string{secret}}})
	s.Node().HandleRPC("whoami/get", whoami)
	expired := hs(t, claims("ada", -time.Minute, nil))
	wrongKey := sign(t, jwt.SigningMethodHS256, []byte(strings.Repeat("w", 32)), "", claims("ada", time.Hour, nil))
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, claims("ada", time.Hour, nil)).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, token, body string
	}{
		{"missing", "", auth.ReasonMissing},
		{"expired", expired, "invalid token: " + auth.ReasonExpired},
		{"wrong key", wrongKey, "invalid token: " + auth.ReasonSignature},
		{"alg none", none, "invalid token: " + auth.ReasonAlgorithm},
		{"garbage", "abc", "invalid token: " + auth.ReasonMalformed},
	} {
		q := ""
		if c.token != "" {
			q = "token=" + url.QueryEscape(c.token)
		}
		status, body := upgrade(t, s, q, http.Header{"Origin": {"http://" + s.Addr()}})
		if status != http.StatusUnauthorized || body != c.body {
			t.Errorf("%s: %d %q, want 401 %q", c.name, status, body, c.body)
		}
		if c.token != "" && strings.Contains(body, c.token) {
			t.Errorf("%s: the body holds the token", c.name)
		}
	}

	tok := chatToken(t, "ada", time.Hour)
	ctx := ctxFor(t)
	clients := map[string]*wsclient.Client{
		"bearer": dialAs(t, s, tok),
		"query":  dialURL(t, "ws://"+s.Addr()+"/ws?token="+url.QueryEscape(tok), wsclient.Options{}),
		"cookie": dialURL(t, "ws://"+s.Addr()+"/ws", wsclient.Options{Header: http.Header{"Cookie": {"fabric_token=" + tok}}}),
		"sse":    dialURL(t, "http://"+s.Addr()+"/events?token="+url.QueryEscape(tok), wsclient.Options{}),
	}
	for name, c := range clients {
		got, err := c.Call(ctx, "whoami/get")
		if err != nil || string(got) != `"ada"` {
			t.Errorf("%s: whoami %s, %v", name, got, err)
		}
	}
}

// rawClient is a bare WebSocket client that sees every frame, control
// frames included, and the close code.
type rawClient struct {
	conn   net.Conn
	frames chan map[string]any
	mu     sync.Mutex
	code   int
	done   chan struct{}
}

func dialRaw(t *testing.T, s *server.Server, token string) *rawClient {
	t.Helper()
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Origin": {"http://" + s.Addr()}, "Authorization": {"Bearer " + token}})}
	conn, br, _, err := d.Dial(ctxFor(t), "ws://"+s.Addr()+"/ws")
	if err != nil {
		t.Fatal(err)
	}
	if br != nil {
		t.Fatal("bytes past the handshake")
	}
	rc := &rawClient{conn: conn, frames: make(chan map[string]any, 256), done: make(chan struct{})}
	go rc.read()
	t.Cleanup(func() { conn.Close(); <-rc.done })
	return rc
}

func (rc *rawClient) read() {
	defer close(rc.done)
	rd := &wsutil.Reader{Source: rc.conn, State: ws.StateClientSide}
	for {
		hdr, err := rd.NextFrame()
		if err != nil {
			return
		}
		if hdr.OpCode == ws.OpClose {
			b, _ := io.ReadAll(rd)
			code, _ := ws.ParseCloseFrameData(b)
			rc.mu.Lock()
			rc.code = int(code)
			rc.mu.Unlock()
			return
		}
		b, err := io.ReadAll(rd)
		if err != nil {
			return
		}
		var m map[string]any
		if hdr.OpCode == ws.OpText && json.Unmarshal(b, &m) == nil {
			rc.frames <- m
		}
	}
}

func (rc *rawClient) send(t *testing.T, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := wsutil.WriteClientText(rc.conn, b); err != nil {
		t.Fatal(err)
	}
}

// next returns the next frame whose "type" (or, for envelopes, "event") is
// typ, skipping others.
func (rc *rawClient) next(t *testing.T, typ string) map[string]any {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-rc.frames:
			if m["type"] == typ || m["event"] == typ {
				return m
			}
		case <-rc.done:
			t.Fatalf("connection closed (code %d) waiting for %q", rc.closeCode(), typ)
		case <-timeout:
			t.Fatalf("no %q frame", typ)
		}
	}
}

func (rc *rawClient) closeCode() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.code
}

// TestRefresh: over a real WebSocket, a connection whose token nears its
// expiry is asked to refresh; a token of the same user is "refreshed" and
// the connection outlives the old expiry; another user's token or a bad
// one is "refresh-denied".
func TestRefresh(t *testing.T) {
	s := startServer(t, server.Options{Auth: server.AuthOptions{Secrets: []string{secret}}})
	c := claims("ada", 3*time.Second, map[string]any{"subscribe": []string{"room:*"}})
	oldExp := time.Unix(int64(c["exp"].(int64)), 0)
	rc := dialRaw(t, s, hs(t, c))
	if m := rc.next(t, "refresh-needed"); int64(m["exp"].(float64)) != oldExp.Unix() {
		t.Fatalf("refresh-needed %v, want exp %d", m, oldExp.Unix())
	}
	rc.send(t, map[string]any{"type": "refresh", "token": chatToken(t, "bob", time.Hour), "ref": 1})
	if m := rc.next(t, "refresh-denied"); m["reason"] != fabric.CodeForbidden {
		t.Fatalf("another user's token: %v", m)
	}
	rc.send(t, map[string]any{"type": "refresh", "token": hs(t, claims("ada", -time.Hour, nil)), "ref": 2})
	if m := rc.next(t, "refresh-denied"); m["reason"] != fabric.CodeUnauthenticated {
		t.Fatalf("an expired token: %v", m)
	}
	fresh := claims("ada", time.Hour, map[string]any{"subscribe": []string{"room:*"}})
	rc.send(t, map[string]any{"type": "refresh", "token": hs(t, fresh), "ref": 3})
	m := rc.next(t, "refreshed")
	if int64(m["exp"].(float64)) != fresh["exp"].(int64) || m["ref"] != float64(3) {
		t.Fatalf("refreshed %v", m)
	}
	// Past the old expiry (and the leeway's worth more), the connection
	// still answers.
	time.Sleep(time.Until(oldExp.Add(time.Second)))
	rc.send(t, map[string]any{"type": "subscribe", "topic": "room:1", "ref": "after"})
	if m := rc.next(t, "subscribed"); m["topic"] != "room:1" {
		t.Fatalf("after the old expiry: %v", m)
	}
}

// TestExpiryCloses: a connection whose token expires without a refresh is
// closed with 4401.
func TestExpiryCloses(t *testing.T) {
	s := startServer(t, server.Options{Auth: server.AuthOptions{Secrets: []string{secret}}})
	rc := dialRaw(t, s, hs(t, claims("ada", 2*time.Second, nil)))
	rc.next(t, "refresh-needed")
	select {
	case <-rc.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection outlived its token")
	}
	if code := rc.closeCode(); code != fabric.CloseTokenExpired {
		t.Fatalf("closed with %d, want %d", code, fabric.CloseTokenExpired)
	}
}

// denied asserts that err is a refused subscribe with reason FORBIDDEN.
func denied(t *testing.T, what string, err error) {
	t.Helper()
	var de *wsclient.DeniedError
	if !errors.As(err, &de) || de.Reason != fabric.CodeForbidden {
		t.Errorf("%s: %v, want a FORBIDDEN denial", what, err)
	}
}

// replayEnd asks for topic's history after 0 and returns its messages and
// the "end" event's error ("" when it succeeded).
func replayEnd(t *testing.T, c *wsclient.Client, topic string) (msgs int, errCode string) {
	t.Helper()
	if err := c.Replay(topic, 0); err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t)
	for {
		env, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("replay %s: %v", topic, err)
		}
		if env.Topic != fabric.ReplayTopicPrefix+topic {
			continue
		}
		switch env.Event {
		case "msg":
			msgs++
		case "end":
			var end struct {
				Error string `json:"error"`
			}
			_ = json.Unmarshal(env.Data, &end)
			return msgs, end.Error
		}
	}
}

// TestTopicRules: the read rules of topic policies decide subscribes,
// history (replay, subscribe with since) and presence reads; the token's
// patterns decide publishes and RPC calls; the application's hooks run
// after the auth checks; a user cannot read another's user: topic or its
// history.
func TestTopicRules(t *testing.T) {
	var appMu sync.Mutex
	var appSaw []string
	s := startServer(t, server.Options{
		Auth: server.AuthOptions{Secrets: []string{secret}},
		Topics: []server.TopicPolicy{
			{Pattern: "news:*", Read: server.ReadPublic, Persistent: true},
			{Pattern: "user:${sub}", Read: server.ReadUser, Persistent: true},
			{Pattern: "dm:${sub}:*", Read: server.ReadUser},
			{Pattern: "room:*", Presence: true, Persistent: true},
		},
		Hooks: fabric.Hooks{Subscribe: func(c *fabric.Client, topic string) error {
			appMu.Lock()
			appSaw = append(appSaw, topic)
			appMu.Unlock()
			if topic == "chat:blocked" {
				return errors.New("blocked by the application")
			}
			return nil
		}},
	})
	s.Node().HandleRPC("chat/send", func(context.Context, *fabric.Call) (any, error) { return "sent", nil })
	s.Node().HandleRPC("admin/kick", func(context.Context, *fabric.Call) (any, error) { return "kicked", nil })
	ctx := ctxFor(t)
	for _, topic := range []string{"user:bob", "user:ada", "room:secret", "room:lobby", "news:1"} {
		if _, err := s.Node().Publish(ctx, topic, "note", map[string]string{"for": topic}); err != nil {
			t.Fatal(err)
		}
	}
	ada := dialAs(t, s, chatToken(t, "ada", time.Hour))
	bob := dialAs(t, s, chatToken(t, "bob", time.Hour))

	// Subscribe.
	for _, topic := range []string{"room:lobby", "chat:1", "news:1", "user:ada", "dm:ada:bob"} {
		if err := ada.Subscribe(ctx, topic); err != nil {
			t.Errorf("subscribe %s: %v", topic, err)
		}
	}
	for _, topic := range []string{"room:secret", "user:bob", "user:ada:x", "dm:bob:ada", "other", "chat:blocked"} {
		denied(t, "subscribe "+topic, ada.Subscribe(ctx, topic))
	}
	appMu.Lock()
	for _, topic := range appSaw {
		if topic == "room:secret" || topic == "user:bob" {
			t.Errorf("the application's hook saw %s, which auth refused", topic)
		}
	}
	appMu.Unlock()

	// History: replay and subscribe with since obey the same rules.
	if n, code := replayEnd(t, bob, "user:bob"); n != 1 || code != "" {
		t.Errorf("bob replays user:bob: %d messages, error %q", n, code)
	}
	if n, code := replayEnd(t, ada, "user:bob"); n != 0 || code != fabric.CodeForbidden {
		t.Errorf("ada replays user:bob: %d messages, error %q", n, code)
	}
	if n, code := replayEnd(t, ada, "room:secret"); n != 0 || code != fabric.CodeForbidden {
		t.Errorf("ada replays room:secret: %d messages, error %q", n, code)
	}
	if n, code := replayEnd(t, ada, "news:1"); n != 1 || code != "" {
		t.Errorf("ada replays news:1: %d messages, error %q", n, code)
	}
	denied(t, "ada subscribes to user:bob since 0", ada.SubscribeSince(ctx, "user:bob", 0))
	if err := bob.SubscribeSince(ctx, "user:bob", 0); err != nil {
		t.Errorf("bob subscribes to user:bob since 0: %v", err)
	}

	// Presence reads are judged as the topic's.
	if err := ada.Subscribe(ctx, fabric.PresenceTopicPrefix+"room:lobby"); err != nil {
		t.Errorf("presence of room:lobby: %v", err)
	}
	denied(t, "presence of room:secret", ada.Subscribe(ctx, fabric.PresenceTopicPrefix+"room:secret"))
	denied(t, "presence of user:bob", ada.Subscribe(ctx, fabric.PresenceTopicPrefix+"user:bob"))

	// RPC paths and client publishes: the token's patterns.
	if got, err := ada.Call(ctx, "chat/send"); err != nil || string(got) != `"sent"` {
		t.Errorf("chat/send: %s, %v", got, err)
	}
	var re *wsclient.RPCError
	if _, err := ada.Call(ctx, "admin/kick"); !errors.As(err, &re) || re.Code != fabric.CodeForbidden {
		t.Errorf("admin/kick: %v", err)
	}
	if _, err := ada.Call(ctx, fabric.PublishRPCPath, "chat:1", "msg", map[string]string{"text": "hi"}); err != nil {
		t.Errorf("publish to chat:1: %v", err)
	}
	for _, topic := range []string{"news:1", "user:ada", "room:lobby"} {
		if _, err := ada.Call(ctx, fabric.PublishRPCPath, topic, "msg", nil); !errors.As(err, &re) || re.Code != fabric.CodeForbidden {
			t.Errorf("publish to %s: %v", topic, err)
		}
	}
}

// TestDenialsClose: auth's refusals count toward the session layer's
// Limits.MaxDenials: a connection refused that often is closed with 4403.
func TestDenialsClose(t *testing.T) {
	s := startServer(t, server.Options{Auth: server.AuthOptions{Secrets: []string{secret}}, Limits: fabric.Limits{MaxDenials: 5}})
	c := dialAs(t, s, chatToken(t, "ada", time.Hour))
	ctx := ctxFor(t)
	for range 4 {
		denied(t, "subscribe room:secret", c.Subscribe(ctx, "room:secret"))
	}
	if code, _ := c.CloseCode(); code != 0 {
		t.Fatalf("closed with %d after 4 denials", code)
	}
	if err := c.Send(map[string]any{"type": "subscribe", "topic": "room:secret"}); err != nil {
		t.Fatal(err)
	}
	fabrictest.WaitFor(t, 10*time.Second, "close 4403", func() bool {
		code, _ := c.CloseCode()
		return code == fabric.CloseForbidden
	})
}

// TestAnonymousPublic: with AllowAnonymous, connections without a token
// read public topics only; tokens still work.
func TestAnonymousPublic(t *testing.T) {
	s := startServer(t, server.Options{
		Auth: server.AuthOptions{Secrets: []string{secret}, AllowAnonymous: true},
		Topics: []server.TopicPolicy{
			{Pattern: "news:*", Read: server.ReadPublic},
			{Pattern: "user:${sub}", Read: server.ReadUser},
		},
	})
	ctx := ctxFor(t)
	anon := dialAs(t, s, "")
	if err := anon.Subscribe(ctx, "news:1"); err != nil {
		t.Errorf("anonymous on news:1: %v", err)
	}
	for _, topic := range []string{"room:lobby", "user:", "user:ada"} {
		denied(t, "anonymous on "+topic, anon.Subscribe(ctx, topic))
	}
	if err := dialAs(t, s, chatToken(t, "ada", time.Hour)).Subscribe(ctx, "user:ada"); err != nil {
		t.Errorf("ada on user:ada: %v", err)
	}
	if status, body := upgrade(t, s, "token=bad", http.Header{"Origin": {"http://" + s.Addr()}}); status != http.StatusUnauthorized {
		t.Errorf("a bad token with anonymous access on: %d %q", status, body)
	}
}

// TestServerReload: Server.Reload re-reads the JWK Set: a new kid works
// after it, the old one until it is removed.
func TestServerReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "jwks.json")
	k1, k2 := rsaKey(), otherRSAKey()
	writeJWKS(t, path, jwk(t, "k1", &k1.PublicKey))
	s := startServer(t, server.Options{Auth: server.AuthOptions{JWKSFile: path}})
	t1 := sign(t, jwt.SigningMethodRS256, k1, "k1", claims("ada", time.Hour, nil))
	t2 := sign(t, jwt.SigningMethodRS256, k2, "k2", claims("ada", time.Hour, nil))
	origin := http.Header{"Origin": {"http://" + s.Addr()}}
	status := func(tok string) int {
		st, _ := upgrade(t, s, "token="+url.QueryEscape(tok), origin)
		return st
	}
	if st := status(t1); st != http.StatusSwitchingProtocols {
		t.Fatalf("k1: %d", st)
	}
	if st, body := upgrade(t, s, "token="+url.QueryEscape(t2), origin); st != http.StatusUnauthorized || body != "invalid token: "+auth.ReasonUnknownKey {
		t.Fatalf("k2 before the reload: %d %q", st, body)
	}
	writeJWKS(t, path, jwk(t, "k1", &k1.PublicKey), jwk(t, "k2", &k2.PublicKey))
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if st1, st2 := status(t1), status(t2); st1 != http.StatusSwitchingProtocols || st2 != http.StatusSwitchingProtocols {
		t.Fatalf("after adding k2: k1 %d, k2 %d", st1, st2)
	}
	if err := os.WriteFile(path, []byte("not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err == nil {
		t.Fatal("a broken JWKS reloaded")
	}
	writeJWKS(t, path, jwk(t, "k2", &k2.PublicKey))
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if st1, st2 := status(t1), status(t2); st1 != http.StatusUnauthorized || st2 != http.StatusSwitchingProtocols {
		t.Fatalf("after removing k1: k1 %d, k2 %d", st1, st2)
	}
}

// TestOptionsRefused: settings that cannot work stop New.
func TestOptionsRefused(t *testing.T) {
	for name, o := range map[string]server.Options{
		"public listen without auth": {HTTP: server.HTTPOptions{Listen: "0.0.0.0:0"}}, // protected mode
		"read rule without auth":     {Topics: []server.TopicPolicy{{Pattern: "user:${sub}", Read: server.ReadUser}}},
		"user rule without ${sub}": {Auth: server.AuthOptions{Secrets: []string{secret}},
			Topics: []server.TopicPolicy{{Pattern: "user:*", Read: server.ReadUser}}},
		"unknown rule": {Auth: server.AuthOptions{Secrets: []string{secret}}, Topics: []server.TopicPolicy{{Pattern: "a", Read: "everyone"}}},
		"short secret": {Auth: server.AuthOptions{Secrets: []string{"short"}}},
	} {
		o.Backend = server.BackendMemory
		if o.HTTP.Listen == "" {
			o.HTTP.Listen = "127.0.0.1:0"
		}
		s, err := server.New(context.Background(), o)
		if err == nil {
			s.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}
