// Package wsedge is Fabric's WebSocket edge: an http.Handler on gobwas/ws
// that speaks the wire protocol of the svelte-adapter-uws and
// svelte-realtime browser clients (see docs/protocol.md).
//
// Every message reaches a connection as one pre-encoded frame shared by all
// local subscribers; frames queued for one connection go out in a single
// writev. On Linux, plain TCP connections are read through epoll readiness,
// so an idle connection holds no goroutine and no buffer; other connections
// (TLS, or Options.GoroutinePerConn) use a reading goroutine each.
package wsedge

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsflate"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults of Options, the same as svelte-adapter-uws.
const (
	DefaultMaxPayloadLength = 16 * 1024
	DefaultIdleTimeout      = 120 * time.Second
	DefaultMaxBackpressure  = 1024 * 1024
)

// Options configures an Edge. The zero value has the seed's defaults.
type Options struct {
	// Drain runs when a connection that had to wait for the peer to read
	// has written everything it had queued (optional).
	Drain func(c *fabric.Client)
	// MaxPayloadLength is the largest message a client may send (default
	// 16 KiB); a larger one closes the connection with 1009.
	MaxPayloadLength int
	// IdleTimeout closes connections that sent nothing, not even a pong, for
	// this long (default 120s; negative disables). With pings on, a healthy
	// client is pinged at half of it and never times out.
	IdleTimeout time.Duration
	// MaxBackpressure is the most bytes queued for one connection (default
	// 1 MiB); past it, messages to that connection are dropped and counted.
	MaxBackpressure int
	// DisablePings turns off the automatic pings.
	DisablePings bool
	// AllowedOrigins: nil or ["same-origin"] accepts only an Origin whose host
	// is the request's Host; ["*"] accepts any; otherwise the exact origins
	// listed. A request without Origin is refused unless the node has a
	// Connect hook (it authenticates instead) or "*" is allowed.
	AllowedOrigins []string
	// AllowedHosts are the Host values a same-origin policy trusts (see
	// fabric.NewOriginPolicy; default: this machine's loopback names).
	AllowedHosts []string
	// Compression negotiates permessage-deflate (off by default). Each
	// message is compressed once and shared by the connections that use it.
	Compression bool
	// GoroutinePerConn reads every connection with its own goroutine instead
	// of epoll readiness.
	GoroutinePerConn bool
	// Logger receives the edge's logs; nil uses the node's.
	Logger *slog.Logger
	// Admission, when set, decides on each upgrade before any work for it
	// (a fast 503 with Retry-After past its cap or budget); share one with
	// the node's other transports.
	Admission *fabric.UpgradeAdmission
}

// Edge is the WebSocket endpoint: an http.Handler mountable at any path.
type Edge struct {
	node     *fabric.Node
	opts     Options
	log      *slog.Logger
	metrics  *fabric.Metrics
	flushers []*flusher
	poller   *poller // nil when every connection gets a goroutine
	origins  *fabric.OriginPolicy

	nextFlusher atomic.Uint64
	dropBP      prometheus.Counter
	dropClosed  prometheus.Counter

	conns    sync.Map // *conn → struct{}
	nconns   atomic.Int64
	closing  atomic.Bool
	done     chan struct{}
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// New returns an Edge serving node's clients.
func New(node *fabric.Node, opts Options) (*Edge, error) {
	if node == nil {
		return nil, errors.New("wsedge: nil node")
	}
	if opts.MaxPayloadLength <= 0 {
		opts.MaxPayloadLength = DefaultMaxPayloadLength
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.MaxBackpressure <= 0 {
		opts.MaxBackpressure = DefaultMaxBackpressure
	}
	e := &Edge{node: node, opts: opts, log: opts.Logger, metrics: node.Metrics(), done: make(chan struct{})}
	if e.log == nil {
		e.log = node.Logger()
	}
	e.dropBP = e.metrics.Dropped.WithLabelValues("backpressure")
	e.dropClosed = e.metrics.Dropped.WithLabelValues("closed")
	e.origins = fabric.NewOriginPolicy(opts.AllowedOrigins, opts.AllowedHosts)
	for range runtime.GOMAXPROCS(0) {
		f := newFlusher(e)
		e.flushers = append(e.flushers, f)
		e.wg.Add(1)
		go f.run()
	}
	if !opts.GoroutinePerConn {
		p, err := newPoller(e)
		if err != nil {
			e.log.Warn("epoll unavailable, using a goroutine per connection", "err", err)
		} else if p != nil {
			e.poller = p
			e.wg.Add(1)
			go p.run()
		}
	}
	e.wg.Add(1)
	go e.sweep()
	return e, nil
}

// Node returns the node the edge serves.
func (e *Edge) Node() *fabric.Node { return e.node }

// Connections returns the number of open WebSocket connections on this edge.
func (e *Edge) Connections() int { return int(e.nconns.Load()) }

// ServeHTTP upgrades the request to a WebSocket connection.
func (e *Edge) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if e.closing.Load() {
		e.refuse(w, http.StatusServiceUnavailable, "server shutting down")
		return
	}
	if !headerHasToken(r.Header, "Upgrade", "websocket") {
		w.Header().Set("Upgrade", "websocket")
		e.refuse(w, http.StatusUpgradeRequired, "expected a WebSocket upgrade request")
		return
	}
	release, refused := e.opts.Admission.Admit(w, r)
	if refused != 0 {
		e.metrics.Handshakes.WithLabelValues(strconv.Itoa(refused)).Inc()
		return
	}
	defer release() // attach has counted the connection in the node by then
	if !e.origins.Allowed(r, e.node.HasConnectHook()) {
		e.refuse(w, http.StatusForbidden, "Origin not allowed")
		return
	}
	userData, status, msg := e.node.Authenticate(r)
	if status != 0 {
		e.refuse(w, status, msg)
		return
	}

	var ext *wsflate.Extension
	u := ws.HTTPUpgrader{Timeout: 10 * time.Second}
	if e.opts.Compression {
		ext = &wsflate.Extension{Parameters: wsflate.DefaultParameters}
		u.Negotiate = ext.Negotiate
	}
	nc, rw, _, err := u.Upgrade(r, w)
	if err != nil {
		e.metrics.Handshakes.WithLabelValues("400").Inc()
		if nc != nil {
			nc.Close()
		}
		return
	}
	e.metrics.Handshakes.WithLabelValues("101").Inc()
	deflate := false
	if ext != nil {
		_, deflate = ext.Accepted()
	}
	var pending []byte
	if rw != nil && rw.Reader.Buffered() > 0 {
		b, _ := rw.Reader.Peek(rw.Reader.Buffered())
		pending = append([]byte(nil), b...)
	}
	e.attach(nc, userData, e.node.ClientAddr(r), deflate, pending)
}

// attach wires an upgraded connection into the node and starts reading it.
func (e *Edge) attach(nc net.Conn, userData any, remote string, deflate bool, pending []byte) *conn {
	c := newConn(e, nc, deflate)
	c.client = e.node.Connect(c, userData, remote)
	e.conns.Store(c, struct{}{})
	e.nconns.Add(1)
	if e.closing.Load() { // raced with Shutdown
		c.Close(int(ws.StatusGoingAway), "server shutting down")
	}
	if len(pending) > 0 {
		c.rmu.Lock()
		c.feed(pending)
		c.rmu.Unlock()
	}
	c.startReading()
	return c
}

func (e *Edge) refuse(w http.ResponseWriter, status int, msg string) {
	e.metrics.Handshakes.WithLabelValues(strconv.Itoa(status)).Inc()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg + "\n"))
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		opts, _ := httphead.ParseOptions([]byte(v), nil)
		for _, opt := range opts {
			if strings.EqualFold(string(opt.Name), token) {
				return true
			}
		}
	}
	return false
}

// Shutdown stops accepting upgrades, closes every connection with 1001
// Going Away, and waits until they are gone or ctx ends (then cuts the rest).
func (e *Edge) Shutdown(ctx context.Context) error {
	e.closing.Store(true)
	e.conns.Range(func(k, _ any) bool {
		k.(*conn).Close(int(ws.StatusGoingAway), "server shutting down")
		return true
	})
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for e.nconns.Load() > 0 {
		select {
		case <-ctx.Done():
			e.conns.Range(func(k, _ any) bool {
				k.(*conn).terminate(1006, "shutdown timeout")
				return true
			})
			e.stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	e.stop()
	return nil
}

// Close cuts every connection at once and stops the edge's goroutines.
func (e *Edge) Close() error {
	e.closing.Store(true)
	e.conns.Range(func(k, _ any) bool {
		k.(*conn).terminate(1006, "edge closed")
		return true
	})
	e.stop()
	return nil
}

func (e *Edge) stop() {
	e.stopOnce.Do(func() {
		close(e.done)
		if e.poller != nil {
			e.poller.wake()
		}
		for _, f := range e.flushers {
			f.wake()
		}
		e.wg.Wait()
		if e.poller != nil {
			e.poller.close()
		}
	})
}

// sweep pings quiet connections and closes idle ones.
func (e *Edge) sweep() {
	defer e.wg.Done()
	idle := e.opts.IdleTimeout
	if idle < 0 {
		return
	}
	every := time.Second
	if idle/4 < every {
		every = max(idle/4, 10*time.Millisecond)
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-e.done:
			return
		case now := <-t.C:
			n := now.UnixNano()
			e.conns.Range(func(k, _ any) bool {
				k.(*conn).checkIdle(n, idle)
				return true
			})
		}
	}
}
