// Package sse is Fabric's Server-Sent Events transport, for clients that
// cannot open a WebSocket (corporate proxies, some mobile networks).
//
// GET /events?topic=a&topic=b opens a text/event-stream that carries
// exactly what a WebSocket connection would: each envelope as one event
// (`event:` is the envelope's event, `data:` the envelope's JSON, `id:` the
// stream's position on its persistent topics). The first event, "session",
// names the stream; the client sends protocol frames (subscribe, RPC, ...)
// as the body of POST /events?session=<id>, so an SSE client can do all a
// WebSocket client can. A stream that reconnects with Last-Event-ID (what
// EventSource does by itself) or ?since= resumes its persistent topics with
// no gap and no duplicate. Everything protocol-related is the Node's
// session layer: this package only frames events (docs/protocol.md).
package sse

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Defaults of Options.
const (
	DefaultMaxBackpressure = 1 << 20
	DefaultHeartbeat       = 15 * time.Second
	DefaultMaxTopics       = 64
	DefaultMaxFrame        = 16 * 1024
	DefaultWriteTimeout    = 10 * time.Second
)

// Options configures a Handler. The zero value has the defaults.
type Options struct {
	// AllowedOrigins is the origin policy (see fabric.NewOriginPolicy):
	// same-origin by default.
	AllowedOrigins []string
	// AllowedHosts are the Host values a same-origin policy trusts (see
	// fabric.NewOriginPolicy; default: this machine's loopback names).
	AllowedHosts []string
	// MaxBackpressure is the most bytes queued for one stream (default
	// 1 MiB); past it, messages to that stream are dropped and counted.
	MaxBackpressure int
	// Heartbeat is how often an idle stream gets a comment line, so that
	// proxies keep it open (default 15s).
	Heartbeat time.Duration
	// MaxTopics bounds the topics one GET may name (default 64).
	MaxTopics int
	// MaxFrame bounds the body of a POST (one protocol frame, default
	// 16 KiB, the WebSocket edge's message limit).
	MaxFrame int
	// WriteTimeout cuts a stream whose client does not take a write for
	// this long (default 10s).
	WriteTimeout time.Duration
	// Logger receives the transport's logs; nil uses the node's.
	Logger *slog.Logger
	// Admission, when set, decides on each stream before any work for it
	// (a fast 503 with Retry-After past its cap or budget); share one with
	// the node's other transports.
	Admission *fabric.UpgradeAdmission
}

// Handler serves SSE streams (GET) and their upstream frames (POST) for one
// Node; mount it at any path, e.g. mux.Handle("/events", h).
type Handler struct {
	node    *fabric.Node
	opts    Options
	log     *slog.Logger
	origins *fabric.OriginPolicy
	metrics *fabric.Metrics

	sessions sync.Map // session id → *conn
	streams  atomic.Int64
	closing  atomic.Bool
	wg       sync.WaitGroup
}

// New returns a Handler serving node's clients over SSE.
func New(node *fabric.Node, opts Options) (*Handler, error) {
	if node == nil {
		return nil, errors.New("sse: nil node")
	}
	if opts.MaxBackpressure <= 0 {
		opts.MaxBackpressure = DefaultMaxBackpressure
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.MaxTopics <= 0 {
		opts.MaxTopics = DefaultMaxTopics
	}
	if opts.MaxFrame <= 0 {
		opts.MaxFrame = DefaultMaxFrame
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	h := &Handler{node: node, opts: opts, log: opts.Logger, origins: fabric.NewOriginPolicy(opts.AllowedOrigins, opts.AllowedHosts), metrics: node.Metrics()}
	if h.log == nil {
		h.log = node.Logger()
	}
	return h, nil
}

// Streams returns the number of open SSE streams.
func (h *Handler) Streams() int { return int(h.streams.Load()) }

// ServeHTTP opens a stream (GET) or takes a frame for one (POST).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
		h.stream(w, r)
	case http.MethodPost:
		h.post(w, r)
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "use GET for a stream, POST for a frame", http.StatusMethodNotAllowed)
	}
}

// post hands the body of POST /events?session=ID to the stream's session.
func (h *Handler) post(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("session")
	v, ok := h.sessions.Load(id)
	if id == "" || !ok {
		http.Error(w, "unknown or closed session", http.StatusNotFound)
		return
	}
	c := v.(*conn)
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(h.opts.MaxFrame)))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			h.metrics.InvalidFrames.WithLabelValues("too big").Inc()
			http.Error(w, fmt.Sprintf("frame larger than %d bytes", h.opts.MaxFrame), http.StatusRequestEntityTooLarge)
			return
		}
		http.Error(w, "reading the frame: "+err.Error(), http.StatusBadRequest)
		return
	}
	if c.client.Closed() {
		http.Error(w, "unknown or closed session", http.StatusNotFound)
		return
	}
	h.node.HandleFrame(c.client, body, false)
	w.WriteHeader(http.StatusNoContent)
}

// stream serves one GET: authenticate, subscribe the URL's topics through
// the session layer (resuming from Last-Event-ID or ?since=), then write
// events until the client goes or the stream is closed.
func (h *Handler) stream(w http.ResponseWriter, r *http.Request) {
	if h.closing.Load() {
		http.Error(w, "server shutting down", http.StatusServiceUnavailable)
		return
	}
	release, refused := h.opts.Admission.Admit(w, r)
	if refused != 0 {
		return
	}
	defer release()
	if !h.origins.Allowed(r, h.node.HasConnectHook()) {
		http.Error(w, "Origin not allowed", http.StatusForbidden)
		return
	}
	q := r.URL.Query()
	topics := q["topic"]
	if len(topics) > h.opts.MaxTopics {
		http.Error(w, fmt.Sprintf("at most %d topics per stream", h.opts.MaxTopics), http.StatusBadRequest)
		return
	}
	for _, t := range topics {
		if err := fabric.ValidateTopic(t); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	}
	resume, err := parseResume(r.Header.Get("Last-Event-ID"), q.Get("since"), q.Get("epoch"), topics)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	userData, status, msg := h.node.Authenticate(r)
	if status != 0 {
		http.Error(w, msg, status)
		return
	}
	rc := http.NewResponseController(w)
	hdr := w.Header()
	hdr.Set("Content-Type", "text/event-stream; charset=utf-8")
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	if o := r.Header.Get("Origin"); o != "" {
		hdr.Set("Access-Control-Allow-Origin", o) // the policy above accepted it
		hdr.Set("Vary", "Origin")
	}
	w.WriteHeader(http.StatusOK)

	c := newConn(h, resume)
	c.client = h.node.Connect(c, userData, h.node.ClientAddr(r))
	release() // the node counts the stream from here on
	h.streams.Add(1)
	h.wg.Add(1)
	defer h.wg.Done()
	defer h.streams.Add(-1)
	h.sessions.Store(c.id, c)
	defer h.sessions.Delete(c.id)
	if h.closing.Load() { // raced with Shutdown
		c.Close(1001, "server shutting down")
	}
	c.writeSession()
	for i, t := range topics {
		frame := subscribeFrame(t, strconv.Itoa(i+1), resume[t])
		h.node.HandleFrame(c.client, frame, false)
	}
	code, reason := c.run(r.Context(), w, rc)
	h.node.Disconnect(c.client, code, reason)
}

// newSessionID returns 128 random bits in hex: knowing it is what lets a
// POST speak for the stream.
func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Shutdown closes every stream with 1001 (a "close" event) and waits until
// they are gone or ctx ends.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.closing.Store(true)
	h.sessions.Range(func(_, v any) bool {
		v.(*conn).Close(1001, "server shutting down")
		return true
	})
	done := make(chan struct{})
	go func() { h.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		h.sessions.Range(func(_, v any) bool {
			v.(*conn).cut()
			return true
		})
		<-done
		return ctx.Err()
	}
}
