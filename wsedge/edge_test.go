package wsedge_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsflate"
)

// modes runs a test with epoll readiness and with a goroutine per connection.
func modes(t *testing.T, fn func(t *testing.T, perConn bool)) {
	t.Run("epoll", func(t *testing.T) { fn(t, false) })
	t.Run("goroutine", func(t *testing.T) { fn(t, true) })
}

func instance(t *testing.T, perConn bool, o wsedge.Options) *fabrictest.Instance {
	return instanceWith(t, perConn, o, fabric.Config{})
}

// instanceWith is instance with a node configuration (hooks, say).
func instanceWith(t *testing.T, perConn bool, o wsedge.Options, cfg fabric.Config) *fabrictest.Instance {
	o.GoroutinePerConn = perConn
	return fabrictest.NewInstance(t, fabrictest.Options{Edge: o, Node: cfg})
}

func timeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// rawConn is a hand-driven WebSocket client for protocol-level tests.
type rawConn struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, url string, header http.Header) (*rawConn, error) {
	if header == nil {
		header = http.Header{"Origin": {"http://" + strings.TrimPrefix(strings.SplitN(url, "/ws", 2)[0], "ws://")}}
	}
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(header), Timeout: 5 * time.Second}
	nc, br, _, err := d.Dial(context.Background(), url)
	if err != nil {
		return nil, err
	}
	if br == nil {
		br = bufio.NewReader(nc)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawConn{t: t, nc: nc, br: br}, nil
}

func (r *rawConn) send(op ws.OpCode, fin bool, p []byte) {
	r.t.Helper()
	f := ws.NewFrame(op, fin, p)
	if err := ws.WriteFrame(r.nc, ws.MaskFrame(f)); err != nil {
		r.t.Fatalf("write frame: %v", err)
	}
}

func (r *rawConn) sendJSON(v any) {
	b, _ := json.Marshal(v)
	r.send(ws.OpText, true, b)
}

// next reads frames until a data frame or close; pings are answered.
func (r *rawConn) next(d time.Duration) (ws.OpCode, []byte, error) {
	_ = r.nc.SetReadDeadline(time.Now().Add(d))
	for {
		h, err := ws.ReadHeader(r.br)
		if err != nil {
			return 0, nil, err
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(r.br, p); err != nil {
			return 0, nil, err
		}
		if h.OpCode == ws.OpPing {
			r.send(ws.OpPong, true, p)
			continue
		}
		return h.OpCode, p, nil
	}
}

// closeCode reads until the server's close frame and returns its code.
func (r *rawConn) closeCode(d time.Duration) int {
	r.t.Helper()
	for {
		op, p, err := r.next(d)
		if err != nil {
			r.t.Fatalf("waiting for close frame: %v", err)
		}
		if op == ws.OpClose {
			if len(p) < 2 {
				return 1005
			}
			return int(p[0])<<8 | int(p[1])
		}
	}
}

func handshakeStatus(err error) int {
	var se ws.StatusError
	if errors.As(err, &se) {
		return int(se)
	}
	return 0
}

func TestUpgradeHook(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		var opened, closed atomic.Int32
		var closeCode atomic.Int32
		inst := instanceWith(t, perConn, wsedge.Options{}, fabric.Config{
			ConnectTimeout: 200 * time.Millisecond,
			Hooks: fabric.Hooks{
				Connect: func(r *http.Request) (any, error) {
					switch r.Header.Get("X-Test") {
					case "deny":
						return nil, fabric.ErrUnauthorized
					case "fail":
						return nil, errors.New("database down")
					case "slow":
						select {
						case <-time.After(2 * time.Second):
						case <-r.Context().Done():
						}
						return "late", nil
					case "teapot":
						return nil, &fabric.StatusError{Status: 418, Message: "no"}
					case "panic":
						panic("boom")
					}
					return map[string]string{"user": r.Header.Get("X-User")}, nil
				},
				Open:       func(c *fabric.Client) { opened.Add(1) },
				Disconnect: func(c *fabric.Client, code int, _ string) { closed.Add(1); closeCode.Store(int32(code)) },
			},
		})
		for hdr, want := range map[string]int{"deny": 401, "fail": 500, "slow": 504, "teapot": 418, "panic": 500} {
			_, err := dialRaw(t, inst.WSURL, http.Header{"X-Test": {hdr}})
			if got := handshakeStatus(err); got != want {
				t.Errorf("Upgrade hook %s: status %d (%v), want %d", hdr, got, err, want)
			}
		}
		if opened.Load() != 0 {
			t.Fatalf("Open ran for refused upgrades")
		}
		// No Origin at all is fine when an Upgrade hook authenticates.
		rc, err := dialRaw(t, inst.WSURL, http.Header{"X-User": {"ada"}})
		if err != nil {
			t.Fatal(err)
		}
		fabrictest.WaitFor(t, 5*time.Second, "Open hook", func() bool { return opened.Load() == 1 })
		var got any
		inst.Node.Each(func(c *fabric.Client) bool { got = c.UserData(); return true })
		if m, ok := got.(map[string]string); !ok || m["user"] != "ada" {
			t.Fatalf("user data %v, want the Upgrade hook's", got)
		}
		rc.send(ws.OpClose, true, ws.NewCloseFrameBody(4000, "bye"))
		if code := rc.closeCode(5 * time.Second); code != 4000 {
			t.Fatalf("close echo %d, want 4000", code)
		}
		fabrictest.WaitFor(t, 5*time.Second, "Close hook", func() bool { return closed.Load() == 1 })
		if closeCode.Load() != 4000 {
			t.Fatalf("Close hook code %d, want the client's 4000", closeCode.Load())
		}
		if inst.Node.Connections() != 0 {
			t.Fatalf("connection still counted after close")
		}
	})
}

func TestOrigins(t *testing.T) {
	cases := []struct {
		name    string
		allowed []string
		origin  string // "-" = no Origin header
		ok      bool
	}{
		{"same-origin match", nil, "HOST", true},
		{"same-origin other host", nil, "http://evil.example", false},
		{"same-origin no header", nil, "-", false},
		{"list match", []string{"https://app.example"}, "https://app.example", true},
		{"list miss", []string{"https://app.example"}, "https://other.example", false},
		{"any", []string{"*"}, "http://whatever.example", true},
		{"any without header", []string{"*"}, "-", true},
	}
	inst := map[string]*fabrictest.Instance{}
	for _, tc := range cases {
		key := strings.Join(tc.allowed, ",")
		if inst[key] == nil {
			inst[key] = instance(t, false, wsedge.Options{AllowedOrigins: tc.allowed})
		}
		in := inst[key]
		h := http.Header{}
		switch tc.origin {
		case "-":
		case "HOST":
			h.Set("Origin", strings.Replace(in.HTTP.URL, "http://", "http://", 1))
		default:
			h.Set("Origin", tc.origin)
		}
		_, err := dialRaw(t, in.WSURL, h)
		if tc.ok && err != nil {
			t.Errorf("%s: refused: %v", tc.name, err)
		}
		if !tc.ok && handshakeStatus(err) != 403 {
			t.Errorf("%s: got %v, want 403", tc.name, err)
		}
	}
}

func TestNotAnUpgrade(t *testing.T) {
	inst := instance(t, false, wsedge.Options{})
	resp, err := http.Get(inst.WSURL[len("ws"):] + "")
	if err == nil {
		resp.Body.Close()
	}
	resp, err = http.Get("http" + strings.TrimPrefix(inst.WSURL, "ws"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: %d, want 426", resp.StatusCode)
	}
}

func TestOversizeMessageCloses1009(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		inst := instance(t, perConn, wsedge.Options{MaxPayloadLength: 1024})
		rc, err := dialRaw(t, inst.WSURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		rc.send(ws.OpText, true, bytes.Repeat([]byte("x"), 1025))
		if code := rc.closeCode(5 * time.Second); code != 1009 {
			t.Fatalf("close code %d, want 1009", code)
		}
		// Fragments that add up past the limit count too.
		rc, _ = dialRaw(t, inst.WSURL, nil)
		rc.send(ws.OpText, false, bytes.Repeat([]byte("x"), 600))
		rc.send(ws.OpContinuation, true, bytes.Repeat([]byte("x"), 600))
		if code := rc.closeCode(5 * time.Second); code != 1009 {
			t.Fatalf("fragmented: close code %d, want 1009", code)
		}
		// Exactly at the limit is fine.
		c := inst.Dial(wsclient.Options{})
		if err := c.SendRaw(bytes.Repeat([]byte(" "), 1024)); err != nil {
			t.Fatal(err)
		}
		if err := c.Subscribe(timeout(t, 5*time.Second), "still-open"); err != nil {
			t.Fatalf("connection unusable after a max-size message: %v", err)
		}
	})
}

func TestProtocolViolations(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		inst := instance(t, perConn, wsedge.Options{})
		for name, tc := range map[string]struct {
			frames func(r *rawConn)
			code   int
		}{
			"unmasked":           {func(r *rawConn) { _ = ws.WriteFrame(r.nc, ws.NewTextFrame([]byte("hi"))) }, 1002},
			"bad utf8":           {func(r *rawConn) { r.send(ws.OpText, true, []byte{0xff, 0xfe}) }, 1007},
			"reserved opcode":    {func(r *rawConn) { r.send(ws.OpCode(0x3), true, []byte("x")) }, 1002},
			"continuation first": {func(r *rawConn) { r.send(ws.OpContinuation, true, []byte("x")) }, 1002},
			"rsv1 without deflate": {func(r *rawConn) {
				f := ws.NewTextFrame([]byte("x"))
				f.Header.Rsv = ws.Rsv(true, false, false)
				_ = ws.WriteFrame(r.nc, ws.MaskFrame(f))
			}, 1002},
			"long ping": {func(r *rawConn) { r.send(ws.OpPing, true, bytes.Repeat([]byte("p"), 126)) }, 1002},
		} {
			rc, err := dialRaw(t, inst.WSURL, nil)
			if err != nil {
				t.Fatal(err)
			}
			tc.frames(rc)
			if got := rc.closeCode(5 * time.Second); got != tc.code {
				t.Errorf("%s: close code %d, want %d", name, got, tc.code)
			}
		}
	})
}

func TestFramingDetails(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		var got []string
		var mu sync.Mutex
		inst := instanceWith(t, perConn, wsedge.Options{}, fabric.Config{Hooks: fabric.Hooks{Message: func(c *fabric.Client, data []byte, bin bool) {
			mu.Lock()
			got = append(got, fmt.Sprintf("%v:%s", bin, data))
			mu.Unlock()
		}}})
		rc, err := dialRaw(t, inst.WSURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		// A fragmented message with a ping between its fragments, a binary
		// message, and a protocol frame split across TCP writes.
		rc.send(ws.OpText, false, []byte("hel"))
		rc.send(ws.OpPing, true, []byte("p1"))
		rc.send(ws.OpContinuation, false, []byte("lo "))
		rc.send(ws.OpContinuation, true, []byte("world"))
		op, p, err := rc.next(5 * time.Second)
		if err != nil || op != ws.OpPong || string(p) != "p1" {
			t.Fatalf("ping answer: %v %q %v", op, p, err)
		}
		rc.send(ws.OpBinary, true, []byte{0, 1, 2})
		var buf bytes.Buffer
		_ = ws.WriteFrame(&buf, ws.MaskFrame(ws.NewTextFrame([]byte(`{"type":"subscribe","topic":"split","ref":1}`))))
		for _, b := range buf.Bytes() {
			if _, err := rc.nc.Write([]byte{b}); err != nil {
				t.Fatal(err)
			}
		}
		op, p, err = rc.next(5 * time.Second)
		if err != nil || !bytes.Contains(p, []byte(`"subscribed"`)) {
			t.Fatalf("byte-by-byte subscribe: %v %s %v", op, p, err)
		}
		fabrictest.WaitFor(t, 5*time.Second, "messages", func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 2 })
		if got[0] != "false:hello world" || got[1] != "true:\x00\x01\x02" {
			t.Fatalf("Message hook got %q", got)
		}
	})
}

func TestSubscribeRules(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		inst := instanceWith(t, perConn, wsedge.Options{}, fabric.Config{Hooks: fabric.Hooks{
			Subscribe: func(c *fabric.Client, topic string) error {
				if strings.HasPrefix(topic, "admin:") {
					return errors.New("admin only")
				}
				return nil
			},
		}})
		ctx := timeout(t, 10*time.Second)
		c := inst.Dial(wsclient.Options{})
		var de *wsclient.DeniedError
		if err := c.Subscribe(ctx, "admin:panel"); !errors.As(err, &de) || de.Reason != fabric.CodeForbidden {
			t.Fatalf("hook denial: %v", err)
		}
		if err := c.Subscribe(ctx, strings.Repeat("x", 257)); !errors.As(err, &de) || de.Reason != fabric.CodeInvalidTopic {
			t.Fatalf("long topic: %v", err)
		}
		if err := c.Subscribe(ctx, "tab\there"); !errors.As(err, &de) || de.Reason != fabric.CodeInvalidTopic {
			t.Fatalf("control character: %v", err)
		}
		if err := c.Subscribe(ctx, "__rpc"); err != nil {
			t.Fatalf("__rpc subscribe (sent by svelte-realtime) refused: %v", err)
		}
		if inst.Node.Subscribers("admin:panel") != 0 || inst.Node.Subscribers("__rpc") != 0 {
			t.Fatal("denied or direct topic was subscribed")
		}
		if err := c.Subscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		inst.Publish("admin:panel", "secret", `1`)
		inst.Publish("news", "ok", `2`)
		e, err := c.Next(ctx)
		if err != nil || e.Topic != "news" {
			t.Fatalf("got %+v %v, want only news", e, err)
		}
		if err := c.Unsubscribe(ctx, "news"); err != nil {
			t.Fatal(err)
		}
		if inst.Node.Subscribers("news") != 0 {
			t.Fatal("unsubscribe left a subscriber")
		}
	})
}

func TestMalformedFramesKeepConnection(t *testing.T) {
	inst := instance(t, false, wsedge.Options{})
	ctx := timeout(t, 10*time.Second)
	c := inst.Dial(wsclient.Options{})
	for _, junk := range []string{`{`, `not json`, `{"type":"subscribe"}`, `{"type":"subscribe","topic":5}`,
		`{"type":"bogus"}`, `[1,2,3]`, `{"rpc":5}`, `{"batch":"x"}`, `{"rpc":"a/b","id":7}`, `""`, `{"type":"replay","topic":"t","since":"x"}`} {
		if err := c.SendRaw([]byte(junk)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Subscribe(ctx, "after-junk"); err != nil {
		t.Fatalf("connection broken by malformed frames: %v", err)
	}
	inst.Publish("after-junk", "ok", `true`)
	if e, err := c.Next(ctx); err != nil || e.Event != "ok" {
		t.Fatalf("%+v %v", e, err)
	}
}

func TestIdleTimeoutAndPings(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		inst := instance(t, perConn, wsedge.Options{IdleTimeout: 600 * time.Millisecond})
		// A client that answers pings (as browsers do) stays connected.
		c := inst.Dial(wsclient.Options{})
		// A client that never answers is cut off after the idle timeout.
		rc, err := dialRaw(t, inst.WSURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		sawPing := false
		for {
			h, err := ws.ReadHeader(rc.br)
			if err != nil {
				break // closed by the server
			}
			if _, err := io.CopyN(io.Discard, rc.br, h.Length); err != nil {
				break
			}
			if h.OpCode == ws.OpPing {
				sawPing = true
			}
		}
		took := time.Since(start)
		if !sawPing {
			t.Error("silent client was never pinged")
		}
		if took < 500*time.Millisecond || took > 3*time.Second {
			t.Errorf("silent client cut after %s, want about the 600ms idle timeout", took)
		}
		time.Sleep(time.Second)
		if err := c.Subscribe(timeout(t, 5*time.Second), "alive"); err != nil {
			t.Fatalf("ponging client was dropped: %v", err)
		}
	})
}

func TestCompression(t *testing.T) {
	inst := instance(t, false, wsedge.Options{Compression: true})
	ctx := timeout(t, 10*time.Second)
	rc, ext := dialDeflate(t, inst)
	if !ext {
		t.Fatal("permessage-deflate not negotiated")
	}
	rc.sendCompressed(`{"type":"subscribe","topic":"zip","ref":"r"}`)
	if _, p := rc.readMessage(); !strings.Contains(p, `"subscribed"`) {
		t.Fatalf("compressed subscribe: %s", p)
	}
	big := strings.Repeat("abcdefgh", 500)
	if _, err := inst.Node.Publish(ctx, "zip", "big", big); err != nil {
		t.Fatal(err)
	}
	wire, p := rc.readMessage()
	if !strings.Contains(p, big) {
		t.Fatalf("decompressed payload wrong: %.80s", p)
	}
	if wire >= len(big) {
		t.Fatalf("compressed frame is %d bytes for %d bytes of text", wire, len(big))
	}
	// A plain client on the same edge still gets plain frames.
	c := inst.Dial(wsclient.Options{})
	if err := c.Subscribe(ctx, "zip"); err != nil {
		t.Fatal(err)
	}
	inst.Publish("zip", "small", `"x"`)
	if e, err := c.Next(ctx); err != nil || e.Event != "small" {
		t.Fatalf("plain client: %+v %v", e, err)
	}
}

func TestRPC(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		var before atomic.Int32
		inst := fabrictest.NewInstance(t, fabrictest.Options{
			Edge: wsedge.Options{GoroutinePerConn: perConn},
			Node: fabric.Config{BeforeExecute: func(ctx context.Context, call *fabric.Call) error {
				before.Add(1)
				if call.Path == "busy/op" {
					return fabric.NewLiveError(fabric.CodeOverloaded, "shedding load")
				}
				return nil
			}},
			Setup: func(in *fabrictest.Instance) {
				in.Node.HandleRPC("math/add", func(ctx context.Context, call *fabric.Call) (any, error) {
					var a, b float64
					if err := call.Arg(0, &a); err != nil {
						return nil, err
					}
					if err := call.Arg(1, &b); err != nil {
						return nil, err
					}
					return a + b, nil
				})
				in.Node.HandleRPC("busy/op", func(context.Context, *fabric.Call) (any, error) { return "ran", nil })
				in.Node.HandleRPC("boom/panic", func(context.Context, *fabric.Call) (any, error) { panic("kaboom") })
				in.Node.HandleRPC("boom/error", func(context.Context, *fabric.Call) (any, error) {
					return nil, errors.New("secret internals")
				})
				in.Node.HandleRPC("who/ami", func(ctx context.Context, call *fabric.Call) (any, error) {
					return call.Client.ID(), nil
				})
			},
		})
		ctx := timeout(t, 10*time.Second)
		c := inst.Dial(wsclient.Options{})
		if r, err := c.Call(ctx, "math/add", 2, 3.5); err != nil || string(r) != "5.5" {
			t.Fatalf("math/add = %s, %v", r, err)
		}
		for path, want := range map[string]string{
			"nope/missing": fabric.CodeNotFound, "busy/op": fabric.CodeOverloaded,
			"boom/panic": fabric.CodeInternal, "boom/error": fabric.CodeInternal, "bad path": fabric.CodeInvalidRequest,
		} {
			_, err := c.Call(ctx, path)
			var re *wsclient.RPCError
			if !errors.As(err, &re) || re.Code != want {
				t.Errorf("%s: %v, want %s", path, err, want)
			}
			if re != nil && strings.Contains(re.Message, "secret") {
				t.Errorf("%s leaked internals: %q", path, re.Message)
			}
		}
		var re *wsclient.RPCError
		if _, err := c.Call(ctx, "math/add", "x"); !errors.As(err, &re) || re.Code != fabric.CodeValidation {
			t.Errorf("bad argument: %v", err)
		}
		// Batches, answered together on event __batch.
		if err := c.SendRaw([]byte(`{"batch":[{"rpc":"math/add","id":"b1","args":[1,1]},{"rpc":"nope/x","id":"b2","args":[]},{"id":"b3"}]}`)); err != nil {
			t.Fatal(err)
		}
		// Fire-and-forget (no id): runs, answers nothing.
		n := before.Load()
		if err := c.SendRaw([]byte(`{"rpc":"math/add","args":[1,2]}`)); err != nil {
			t.Fatal(err)
		}
		if err := c.SendRaw([]byte(`{"rpc":"math/add","id":"q","args":{"not":"array"}}`)); err != nil {
			t.Fatal(err)
		}
		fabrictest.WaitFor(t, 5*time.Second, "volatile call", func() bool { return before.Load() >= n+1 })
		if _, err := c.Call(ctx, "who/ami"); err != nil {
			t.Fatal(err)
		}
	})
}

func TestRPCRawShapes(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{Setup: func(in *fabrictest.Instance) {
		in.Node.HandleRPC("math/add", func(ctx context.Context, call *fabric.Call) (any, error) {
			var a, b int
			_ = call.Arg(0, &a)
			_ = call.Arg(1, &b)
			return a + b, nil
		})
	}})
	rc, err := dialRaw(t, inst.WSURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	expect := func(want string) {
		t.Helper()
		_, p, err := rc.next(5 * time.Second)
		if err != nil || string(p) != want {
			t.Fatalf("got %s (%v)\nwant %s", p, err, want)
		}
	}
	rc.send(ws.OpText, true, []byte(`{"rpc":"math/add","id":"k\"1","args":[2,3]}`))
	expect(`{"topic":"__rpc","event":"k\"1","data":{"id":"k\"1","ok":true,"data":5}}`)
	rc.send(ws.OpText, true, []byte(`{"batch":[{"rpc":"math/add","id":"b1","args":[1,1]},{"rpc":"nope/x","id":"b2","args":[]},{"id":"b3"}]}`))
	expect(`{"topic":"__rpc","event":"__batch","data":{"batch":[{"id":"b1","ok":true,"data":2},{"id":"b2","ok":false,"code":"NOT_FOUND","error":"Not found"},{"id":"b3","ok":false,"code":"INVALID_REQUEST","error":"Each batch entry requires rpc and id"}]}}`)
	rc.send(ws.OpText, true, []byte(`{"rpc":"math/add","id":"q","args":{"not":"array"}}`))
	expect(`{"topic":"__rpc","event":"q","data":{"id":"q","ok":false,"code":"INVALID_REQUEST","error":"args must be an array"}}`)
	rc.send(ws.OpText, true, []byte(`{"type":"replay","topic":"chat","since":0}`))
	expect(`{"topic":"__replay:chat","event":"end","data":{"seq":0,"epoch":"","recovered":true}}`)
}

// dialDeflate connects offering permessage-deflate.
func dialDeflate(t *testing.T, inst *fabrictest.Instance) (*rawConn, bool) {
	t.Helper()
	ext := wsflate.Extension{Parameters: wsflate.DefaultParameters}
	d := ws.Dialer{
		Header:     ws.HandshakeHeaderHTTP(http.Header{"Origin": {inst.HTTP.URL}}),
		Extensions: []httphead.Option{ext.Parameters.Option()},
		Timeout:    5 * time.Second,
	}
	nc, br, hs, err := d.Dial(context.Background(), inst.WSURL)
	if err != nil {
		t.Fatal(err)
	}
	if br == nil {
		br = bufio.NewReader(nc)
	}
	t.Cleanup(func() { nc.Close() })
	accepted := false
	for _, e := range hs.Extensions {
		if string(e.Name) == wsflate.ExtensionName {
			accepted = true
		}
	}
	return &rawConn{t: t, nc: nc, br: br}, accepted
}

func (r *rawConn) sendCompressed(msg string) {
	r.t.Helper()
	f, err := wsflate.CompressFrame(ws.NewTextFrame([]byte(msg)))
	if err != nil {
		r.t.Fatal(err)
	}
	if err := ws.WriteFrame(r.nc, ws.MaskFrame(f)); err != nil {
		r.t.Fatal(err)
	}
}

// readMessage reads one data frame, decompressing it when RSV1 is set, and
// returns its size on the wire and its text.
func (r *rawConn) readMessage() (int, string) {
	r.t.Helper()
	_ = r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := ws.ReadFrame(r.br)
		if err != nil {
			r.t.Fatal(err)
		}
		if f.Header.OpCode.IsControl() {
			continue
		}
		wire := len(f.Payload)
		if f.Header.Rsv1() {
			if f, err = wsflate.DecompressFrame(f); err != nil {
				r.t.Fatal(err)
			}
		}
		return wire, string(f.Payload)
	}
}
