// Package fabrictest starts real Fabric instances for tests: embedded or
// external NATS, a Node, a WebSocket edge and an HTTP server on free
// loopback ports, clusters of them, and clients. Everything it starts is
// stopped by t.Cleanup.
package fabrictest

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/api"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/sse"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Options configures NewInstance. The zero value is a standalone instance
// with embedded NATS in a temporary data dir.
type Options struct {
	// Embed configures the embedded server (DataDir defaults to t.TempDir()).
	Embed embed.Options
	// NATSURL connects to an existing NATS server instead of embedding one.
	NATSURL string
	// Prefix is the subject prefix (default: one per test, so tests sharing
	// an external server never see each other's messages).
	Prefix string
	// Node is the node config; Broker and Registerer are filled in.
	Node fabric.Config
	// Edge configures the WebSocket edge.
	Edge wsedge.Options
	// SSE configures the SSE transport.
	SSE sse.Options
	// History, when set, returns the node's history backend (built on the
	// instance's NATS connection) before the node is created.
	History func(inst *Instance) (fabric.History, error)
	// Setup runs after the node and edge exist and before HTTP serves, to
	// wire extensions (history, presence) and routes.
	Setup func(inst *Instance)
}

// Instance is one running Fabric instance.
type Instance struct {
	T      testing.TB
	Server *embed.Server // nil with an external NATS
	NC     *nats.Conn
	JS     jetstream.JetStream
	Broker *fjs.Broker
	Node   *fabric.Node
	Edge   *wsedge.Edge
	SSE    *sse.Handler
	Mux    *http.ServeMux
	HTTP   *httptest.Server
	// WSURL is ws://127.0.0.1:port/ws.
	WSURL string
	// SSEURL is http://127.0.0.1:port/events.
	SSEURL string

	stopped bool
}

// NewInstance starts an instance; it is stopped at cleanup.
func NewInstance(t testing.TB, o Options) *Instance {
	t.Helper()
	inst := &Instance{T: t}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if o.NATSURL != "" {
		nc, err := nats.Connect(o.NATSURL, nats.MaxReconnects(-1))
		if err != nil {
			t.Fatalf("fabrictest: connect %s: %v", o.NATSURL, err)
		}
		inst.NC = nc
	} else {
		eo := o.Embed
		if eo.DataDir == "" {
			eo.DataDir = t.TempDir()
		}
		if eo.Logger == nil {
			eo.Logger = Logger(t)
		}
		s, err := embed.Start(ctx, eo)
		if err != nil {
			t.Fatalf("fabrictest: embedded NATS: %v", err)
		}
		inst.Server = s
		if inst.NC, err = s.Connect(); err != nil {
			s.Shutdown()
			t.Fatalf("fabrictest: %v", err)
		}
	}
	var err error
	if inst.JS, err = jetstream.New(inst.NC); err != nil {
		t.Fatal(err)
	}
	prefix := o.Prefix
	if prefix == "" {
		prefix = TestPrefix(t)
	}
	inst.Broker = fjs.NewBroker(inst.NC, fjs.BrokerOptions{Prefix: prefix})
	nc := o.Node
	nc.Broker = inst.Broker
	if nc.Logger == nil {
		nc.Logger = Logger(t)
	}
	if o.History != nil {
		if nc.History, err = o.History(inst); err != nil {
			t.Fatalf("fabrictest: history: %v", err)
		}
	}
	if inst.Node, err = fabric.NewNode(nc); err != nil {
		t.Fatal(err)
	}
	if inst.Edge, err = wsedge.New(inst.Node, o.Edge); err != nil {
		t.Fatal(err)
	}
	if inst.SSE, err = sse.New(inst.Node, o.SSE); err != nil {
		t.Fatal(err)
	}
	inst.Mux = http.NewServeMux()
	inst.Mux.Handle("/ws", inst.Edge)
	inst.Mux.Handle("/events", inst.SSE)
	inst.Mux.Handle("/api/", api.New(api.Options{Node: inst.Node}))
	if o.Setup != nil {
		o.Setup(inst)
	}
	inst.HTTP = httptest.NewServer(inst.Mux)
	inst.WSURL = "ws" + strings.TrimPrefix(inst.HTTP.URL, "http") + "/ws"
	inst.SSEURL = inst.HTTP.URL + "/events"
	t.Cleanup(inst.Stop)
	return inst
}

// Stop shuts the instance down cleanly (idempotent).
func (inst *Instance) Stop() {
	if inst.stopped {
		return
	}
	inst.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = inst.Edge.Shutdown(ctx)
	_ = inst.SSE.Shutdown(ctx)
	inst.HTTP.Close()
	_ = inst.Node.Close()
	_ = inst.Broker.Close()
	inst.NC.Close()
	if inst.Server != nil {
		inst.Server.Shutdown()
	}
}

// Kill stops the instance the way a crash would: its NATS server goes away
// without draining, connections are cut, nothing is cleaned up politely.
func (inst *Instance) Kill() {
	if inst.stopped {
		return
	}
	inst.stopped = true
	if inst.Server != nil {
		inst.Server.Shutdown()
	}
	_ = inst.Edge.Close()
	inst.HTTP.CloseClientConnections()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = inst.SSE.Shutdown(ctx)
	cancel()
	inst.HTTP.Close()
	_ = inst.Broker.Close()
	inst.NC.Close()
}

// Dial connects a WebSocket client to the instance; it is closed at cleanup.
func (inst *Instance) Dial(opts wsclient.Options) *wsclient.Client {
	inst.T.Helper()
	return inst.DialURL(inst.WSURL, opts)
}

// DialSSE connects an SSE client to the instance; it is closed at cleanup.
func (inst *Instance) DialSSE(opts wsclient.Options) *wsclient.Client {
	inst.T.Helper()
	return inst.DialURL(inst.SSEURL, opts)
}

// DialURL connects a client to url (WebSocket or SSE, by its scheme); it is
// closed at cleanup.
func (inst *Instance) DialURL(url string, opts wsclient.Options) *wsclient.Client {
	inst.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wsclient.Dial(ctx, url, opts)
	if err != nil {
		inst.T.Fatalf("fabrictest: dial: %v", err)
	}
	inst.T.Cleanup(func() { c.Close() })
	return c
}

// Publish publishes through the HTTP API, failing the test on any error.
func (inst *Instance) Publish(topic, event, dataJSON string) {
	inst.T.Helper()
	body := fmt.Sprintf(`{"topic":%q,"event":%q,"data":%s}`, topic, event, dataJSON)
	resp, err := http.Post(inst.HTTP.URL+"/api/publish", "application/json", bytes.NewBufferString(body))
	if err != nil {
		inst.T.Fatalf("fabrictest: publish: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		inst.T.Fatalf("fabrictest: publish: %s", resp.Status)
	}
}

// Cluster starts n instances whose embedded servers route to each other and
// waits until every route is up (and, with JetStream clustered, until it
// answers). base configures each instance; Embed.Name, cluster and routes
// are set here. A base Embed.DataDir is the parent of the instances' data
// dirs (<dir>/0, <dir>/1, ...), so a cluster can be restarted on them.
func Cluster(t testing.TB, n int, base Options) []*Instance {
	t.Helper()
	// Every port up front and distinct: a clustered server left to pick its
	// own client port could take another instance's cluster port.
	all := FreeAddrs(t, 2*n)
	addrs, clientAddrs := all[:n], all[n:]
	routes := make([]string, n)
	for i, a := range addrs {
		routes[i] = "nats://" + a
	}
	if base.Prefix == "" {
		base.Prefix = TestPrefix(t) // one prefix for the whole cluster
	}
	insts := make([]*Instance, n)
	for i := range insts {
		o := base
		o.Embed.Name = fmt.Sprintf("%s-%d", sanitize(t.Name()), i)
		o.Embed.ClusterName = "fabrictest"
		o.Embed.ClusterListen = addrs[i]
		o.Embed.Routes = routes
		if base.Embed.DataDir != "" {
			o.Embed.DataDir = filepath.Join(base.Embed.DataDir, strconv.Itoa(i))
		}
		if o.Embed.ClientListen == "" {
			o.Embed.ClientListen = clientAddrs[i]
		}
		insts[i] = NewInstance(t, o)
	}
	WaitFor(t, 30*time.Second, "cluster routes", func() bool {
		for _, in := range insts {
			if in.Server.NATS().NumRoutes() < n-1 {
				return false
			}
		}
		return true
	})
	WaitFor(t, 60*time.Second, "clustered JetStream", func() bool {
		for _, in := range insts {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := in.JS.AccountInfo(ctx)
			cancel()
			if err != nil {
				return false
			}
		}
		return true
	})
	return insts
}

// StartNATS runs a standalone nats-server with JetStream on a free loopback
// port (an "external" deployment) and returns it; it stops at cleanup.
func StartNATS(t testing.TB, configure func(*server.Options)) *server.Server {
	t.Helper()
	o := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true}
	if configure != nil {
		configure(o)
	}
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatalf("fabrictest: nats-server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("fabrictest: nats-server not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

// MachineNATS returns the URL of a NATS server with JetStream already
// running on 127.0.0.1:4222, or "" when there is none (unless CI=true, where
// its absence fails the test).
func MachineNATS(t testing.TB) string {
	t.Helper()
	const url = "nats://127.0.0.1:4222"
	nc, err := nats.Connect(url, nats.Timeout(time.Second))
	if err == nil {
		defer nc.Close()
		js, _ := jetstream.New(nc)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if _, err = js.AccountInfo(ctx); err == nil {
			return url
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("fabrictest: CI=true but no NATS with JetStream on %s: %v (start one: nats-server -a 127.0.0.1 -p 4222 -js)", url, err)
	}
	return ""
}

// TestPrefix returns a subject prefix unique to this call.
func TestPrefix(testing.TB) string { return fmt.Sprintf("ft%08x", rand.Uint32()) }

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '_'
	}, s)
}

// FreeAddr returns a free 127.0.0.1:port.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreeAddrs returns n distinct free 127.0.0.1 addresses (all held open
// while they are chosen).
func FreeAddrs(t testing.TB, n int) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		out[i] = l.Addr().String()
	}
	return out
}

// WaitFor polls cond until it holds or timeout passes, then fails the test.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("fabrictest: timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Logger returns a logger that writes through t.Log at warn level and above
// (FABRIC_TEST_LOG=debug shows everything).
func Logger(t testing.TB) *slog.Logger {
	lv := slog.LevelWarn
	if os.Getenv("FABRIC_TEST_LOG") == "debug" {
		lv = slog.LevelDebug
	}
	w := &tWriter{t: t}
	t.Cleanup(func() { w.done.Store(true) })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv}))
}

// tWriter writes through t.Log until the test ends (t.Log after that panics).
type tWriter struct {
	t    testing.TB
	done atomic.Bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}
