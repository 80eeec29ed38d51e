package api_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/api"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
)

// TestErrorCodes: every error code, with its status, from the method that
// causes it.
func TestErrorCodes(t *testing.T) {
	in := memCluster(t, 1, memOptions{api: api.Options{MaxBatch: 3}})[0]
	long := strings.Repeat("x", api.MaxUserLength+1)
	for _, tc := range []struct {
		method, body string
		status       int
		code         string
	}{
		{"publish", `{"topic":`, 400, api.CodeBadRequest},
		{"publish", `["topic"]`, 400, api.CodeBadRequest},
		{"publish", `{"topic":"t","event":"e"} {}`, 400, api.CodeBadRequest},
		{"publish", `{"topic":5,"event":"e"}`, 400, api.CodeBadRequest},
		{"publish", `{"topic":"t","event":"e","data":{bad}}`, 400, api.CodeBadRequest},
		{"publish", "{\"topic\":\"t\",\"event\":\"e\",\"data\":\"\xff\"}", 400, api.CodeBadRequest},
		{"publish", `{"topic":"t","event":"e","persist":"yes"}`, 400, api.CodeBadRequest},
		{"publish", `{"event":"e"}`, 400, api.CodeInvalidTopic},
		{"publish", `{"topic":"a\"b","event":"e"}`, 400, api.CodeInvalidTopic},
		{"publish", `{"topic":"__rpc","event":"e"}`, 400, api.CodeReservedTopic},
		{"publish", `{"topic":"t"}`, 400, api.CodeInvalidEvent},
		{"publish", `{"topic":"t","event":"\u0001"}`, 400, api.CodeInvalidEvent},
		{"batch", `{"messages":{}}`, 400, api.CodeBadRequest},
		{"batch", `{"messages":[{},{},{},{}]}`, 413, api.CodeTooManyItems},
		{"broadcast", `{"topics":["a","b"],"event":""}`, 400, api.CodeInvalidEvent},
		{"broadcast", `{"topics":["a","b","c","d"],"event":"e"}`, 413, api.CodeTooManyItems},
		{"broadcast", `{"topics":[1],"event":"e"}`, 400, api.CodeBadRequest},
		{"history", `{"topic":""}`, 400, api.CodeInvalidTopic},
		{"history", `{"topic":"t","since":-1}`, 400, api.CodeBadRequest},
		{"history", `{"topic":"t","limit":"all"}`, 400, api.CodeBadRequest},
		{"presence", `{}`, 400, api.CodeInvalidTopic},
		{"channels", `{"pattern":"` + strings.Repeat("*", api.MaxPatternLength+1) + `"}`, 400, api.CodeBadRequest},
		{"channels", `{"limit":1.5}`, 400, api.CodeBadRequest},
		{"info", `[]`, 400, api.CodeBadRequest},
		{"disconnect", `{}`, 400, api.CodeBadRequest},
		{"disconnect", `{"user":"` + long + `"}`, 400, api.CodeBadRequest},
		{"disconnect", `{"user":1.5}`, 400, api.CodeBadRequest},
		{"disconnect", `{"user":"u","code":1006}`, 400, api.CodeBadRequest},
		{"disconnect", `{"user":"u","code":5000}`, 400, api.CodeBadRequest},
		{"disconnect", `{"user":"u","reason":"` + strings.Repeat("r", api.MaxReasonLength+1) + `"}`, 400, api.CodeBadRequest},
		{"unsubscribe", `{"topic":"t"}`, 400, api.CodeBadRequest},
		{"unsubscribe", `{"user":"u","topic":""}`, 400, api.CodeInvalidTopic},
		{"nope", `{}`, 404, api.CodeNotFound},
		{"publish/x", `{}`, 404, api.CodeNotFound},
		{"", `{}`, 404, api.CodeNotFound},
	} {
		in.wantError(tc.method, tc.body, tc.status, tc.code)
	}
	// Disconnect codes a server may send are taken.
	for _, code := range []string{"1000", "1001", "1008", "1011", "1012", "1013", "3000", "4999"} {
		in.must("disconnect", `{"user":"u","code":`+code+`}`)
	}
}

// TestNotEnabled: methods whose part the server does not run say so.
func TestNotEnabled(t *testing.T) {
	in := memCluster(t, 1, memOptions{noHistory: true, noPresence: true, noCluster: true})[0]
	in.wantError("publish", `{"topic":"t","event":"e","persist":true}`, 400, api.CodeNoHistory)
	r := in.must("batch", `{"messages":[{"topic":"t","event":"e","persist":true},{"topic":"t","event":"e"}]}`)
	res := r["results"].([]any)
	if res[0].(map[string]any)["error"].(map[string]any)["code"] != api.CodeNoHistory || res[1].(map[string]any)["ok"] != true {
		t.Fatalf("batch without history: %v", r)
	}
	in.wantError("broadcast", `{"topics":["t"],"event":"e","persist":true}`, 400, api.CodeNoHistory)
	in.wantError("history", `{"topic":"t"}`, 404, api.CodeNotEnabled)
	in.wantError("presence", `{"topic":"t"}`, 404, api.CodeNotEnabled)
	for _, m := range []string{"channels", "info", "disconnect", "unsubscribe"} {
		in.wantError(m, `{"user":"u","topic":"t"}`, 404, api.CodeNotEnabled)
	}
}

// TestUnavailable: a node that is closing answers UNAVAILABLE.
func TestUnavailable(t *testing.T) {
	in := memCluster(t, 1, memOptions{})[0]
	_ = in.node.Close()
	in.wantError("publish", `{"topic":"t","event":"e"}`, 503, api.CodeUnavailable)
	r := in.must("batch", `{"messages":[{"topic":"t","event":"e"}]}`)
	if r["results"].([]any)[0].(map[string]any)["error"].(map[string]any)["code"] != api.CodeUnavailable {
		t.Fatalf("batch on a closed node: %v", r)
	}
}

// TestLimits: the body cap (declared or not), the HTTP method, and the
// answer to every success being {"ok":true,...}.
func TestLimits(t *testing.T) {
	in := memCluster(t, 1, memOptions{api: api.Options{MaxBody: 1024}})[0]
	big := `{"topic":"t","event":"e","data":"` + strings.Repeat("x", 1024) + `"}`
	in.wantError("publish", big, 413, api.CodePayloadTooLarge)
	// A chunked body of unknown length is cut at the cap as well.
	req, _ := http.NewRequest(http.MethodPost, in.apiURL+"publish", io.MultiReader(strings.NewReader(big), strings.NewReader(big)))
	req.Header.Set("Content-Type", "application/json")
	req.ContentLength = -1
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	checkError(t, "chunked body", resp.StatusCode, string(body), 413, api.CodePayloadTooLarge)
	// Exactly the cap is fine.
	const head = `{"topic":"t","event":"e","data":"`
	exact := head + strings.Repeat("x", 1024-len(head)-2) + `"}`
	in.must("publish", exact)
	// No body at all is {}: a publish without a topic.
	in.wantError("publish", ``, 400, api.CodeInvalidTopic)
	in.wantError("publish", " \n", 400, api.CodeInvalidTopic)

	for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodDelete} {
		req, _ := http.NewRequest(method, in.apiURL+"publish", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		checkError(t, method, resp.StatusCode, string(body), 405, api.CodeMethodNotAllowed)
		if resp.Header.Get("Allow") != http.MethodPost {
			t.Errorf("%s: Allow %q", method, resp.Header.Get("Allow"))
		}
	}
}

// TestAuth: with a key, "Authorization: Bearer <key>" from anywhere;
// without one, loopback peers only.
func TestAuth(t *testing.T) {
	in := memCluster(t, 1, memOptions{api: api.Options{Key: "s3cret"}})[0]
	for _, tc := range []struct {
		header string
		status int
	}{{"", 401}, {"Bearer wrong", 401}, {"s3cret", 401}, {"Basic s3cret", 401}, {"Bearer s3cret", 200}, {"bearer s3cret", 200}} {
		req, _ := http.NewRequest(http.MethodPost, in.apiURL+"publish", strings.NewReader(`{"topic":"t","event":"e"}`))
		if tc.header != "" {
			req.Header.Set("Authorization", tc.header)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if tc.status != 200 {
			checkError(t, "Authorization: "+tc.header, resp.StatusCode, string(body), tc.status, api.CodeUnauthorized)
		} else if resp.StatusCode != 200 {
			t.Errorf("Authorization %q: %d %s", tc.header, resp.StatusCode, body)
		}
	}
	// Unauthenticated callers learn nothing of the methods.
	status, body := post(t, in.apiURL+"nope", `{}`, "")
	checkError(t, "unknown method without key", status, body, 401, api.CodeUnauthorized)

	// Without a key: the peer address decides (a reverse proxy on the same
	// host makes every caller loopback).
	b := memory.New(memory.Options{})
	t.Cleanup(func() { _ = b.Close() })
	node, err := fabric.NewNode(fabric.Config{Broker: b.Broker()})
	if err != nil {
		t.Fatal(err)
	}
	h := api.New(api.Options{Node: node})
	for _, tc := range []struct {
		remote string
		status int
	}{{"10.1.2.3:5555", 403}, {"[2001:db8::1]:5555", 403}, {"192.168.1.1:1", 403}, {"garbage", 403}, {"", 403},
		{"127.0.0.1:5555", 200}, {"127.9.9.9:1", 200}, {"[::1]:5555", 200}, {"[::ffff:127.0.0.1]:5555", 200}} {
		req := httptest.NewRequest(http.MethodPost, "/api/publish", strings.NewReader(`{"topic":"t","event":"e"}`))
		req.Header.Set("Content-Type", "application/json")
		req.RemoteAddr = tc.remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.status {
			t.Errorf("from %q: %d %s, want %d", tc.remote, rec.Code, rec.Body, tc.status)
		}
		if tc.status == 403 {
			checkError(t, "from "+tc.remote, rec.Code, rec.Body.String(), 403, api.CodeForbidden)
		}
	}
	// From loopback, what a web page (cross-site, or by DNS rebinding) or a
	// reverse proxy on this host would send is refused too.
	for name, hdr := range map[string]http.Header{
		"a cross-site page":          {"Content-Type": {"text/plain"}, "Origin": {"http://evil.example"}},
		"a rebinding page":           {"Content-Type": {"application/json"}, "Origin": {"http://rebind.evil.example"}},
		"a form post":                {"Content-Type": {"application/x-www-form-urlencoded"}},
		"fetch metadata":             {"Content-Type": {"application/json"}, "Sec-Fetch-Site": {"cross-site"}},
		"a same-host reverse proxy":  {"Content-Type": {"application/json"}, "X-Forwarded-For": {"203.0.113.9"}},
		"a proxy naming no one else": {"Content-Type": {"application/json"}, "Forwarded": {"for=127.0.0.1"}},
	} {
		req := httptest.NewRequest(http.MethodPost, "/api/publish", strings.NewReader(`{"topic":"t","event":"e"}`))
		req.Header = hdr
		req.RemoteAddr = "127.0.0.1:5555"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		checkError(t, name, rec.Code, rec.Body.String(), 403, api.CodeForbidden)
	}
	// A trusted proxy's client on this host is still not "local".
	proxies, _ := fabric.NewProxyPolicy([]string{"127.0.0.1"})
	hp := api.New(api.Options{Node: node, Proxies: proxies})
	req := httptest.NewRequest(http.MethodPost, "/api/publish", strings.NewReader(`{"topic":"t","event":"e"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Forwarded-For", "127.0.0.1")
	req.RemoteAddr = "127.0.0.1:5555"
	rec := httptest.NewRecorder()
	hp.ServeHTTP(rec, req)
	checkError(t, "proxied loopback", rec.Code, rec.Body.String(), 403, api.CodeForbidden)
}

// TestPublishCompat: the answers of the old POST /api/publish, byte for
// byte, and its data rules (absent data is null; the data is passed on as
// sent).
func TestPublishCompat(t *testing.T) {
	in := memCluster(t, 1, memOptions{})[0]
	c := in.dial("")
	ctx := testCtx(t, 30*time.Second)
	if err := c.Subscribe(ctx, "orders"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ body, answer, data string }{
		{`{"topic":"orders","event":"created","data":{"id":7}}`, `{"ok":true}`, `{"id":7}`},
		{`{"event":"created","topic":"orders"}`, `{"ok":true}`, `null`},
		{` {"topic":"orders","event":"created","data": [1, 2] ,"extra":{"x":[]}} `, `{"ok":true}`, `[1, 2]`},
		{`{"topic":"orders","event":"created","data":"\u00e9\ud83d\ude00"}`, `{"ok":true}`, `"\u00e9\ud83d\ude00"`},
		{`{"topic":"ord\u0065rs","event":"created","data":1}`, `{"ok":true}`, `1`},
		{`{"topic":"orders","event":"created","data":1,"persist":true}`, `{"ok":true,"seq":1}`, `1`},
	} {
		status, answer := in.call("publish", tc.body, "")
		if status != 200 || answer != tc.answer {
			t.Errorf("%s: %d %s, want %s", tc.body, status, answer, tc.answer)
		}
		if e := next(t, ctx, c, "orders"); e.Event != "created" || !bytes.Equal(e.Data, []byte(tc.data)) {
			t.Errorf("%s: subscriber got %+v, want data %s", tc.body, e, tc.data)
		}
	}
}

// TestHistoryLimits: limits default and are capped; the read pages.
func TestHistoryLimits(t *testing.T) {
	in := memCluster(t, 1, memOptions{api: api.Options{MaxHistoryLimit: 3}})[0]
	for range 5 {
		in.must("publish", `{"topic":"h","event":"e","persist":true}`)
	}
	r := in.must("history", `{"topic":"h","limit":100}`)
	if n := len(r["messages"].([]any)); n != 3 || r["more"] != true {
		t.Fatalf("limit above the cap: %d messages, %v", n, r)
	}
	r = in.must("history", `{"topic":"h","since":3}`)
	if n := len(r["messages"].([]any)); n != 2 || r["more"] != false {
		t.Fatalf("since 3: %v", r)
	}
	r = in.must("history", `{"topic":"none"}`)
	if n := len(r["messages"].([]any)); n != 0 || r["complete"] != true {
		t.Fatalf("a topic without history: %v", r)
	}
}

// TestDropIn: the handler serves under any prefix and ignores the
// request's Content-Type.
func TestDropIn(t *testing.T) {
	b := memory.New(memory.Options{})
	t.Cleanup(func() { _ = b.Close() })
	node, err := fabric.NewNode(fabric.Config{Broker: b.Broker()})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/fabric/", api.New(api.Options{Node: node, Prefix: "/v1/fabric/"}))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	resp, err := http.Post(srv.URL+"/v1/fabric/publish", "application/json", strings.NewReader(`{"topic":"t","event":"e"}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != `{"ok":true}` {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
}
