// Package api is Fabric's server HTTP API: POST /api/<method> with a JSON
// body, answered with a JSON body, for the application's backend (publish,
// batch, broadcast, history, presence, channels, info, disconnect,
// unsubscribe). Every method has one style, Centrifugo's: the request is a
// JSON object, a success is 200 with {"ok":true,...}, a failure is
// {"error":{"code":CODE,"message":TEXT}} with the HTTP status of its code
// (see the Code constants and docs/api.md).
//
// Mount it as mux.Handle("/api/", api.New(api.Options{...})).
package api

import (
	"context"
	"crypto/subtle"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Defaults of Options.
const (
	// DefaultMaxBody is the largest request body accepted (1 MiB, NATS's
	// default message limit).
	DefaultMaxBody = 1 << 20
	// DefaultMaxBatch is the most messages of a batch, and topics of a
	// broadcast.
	DefaultMaxBatch = 1000
	// DefaultHistoryLimit is the most messages a history call returns
	// when it sets no limit.
	DefaultHistoryLimit = 100
	// DefaultMaxHistoryLimit is the most messages a history call returns.
	DefaultMaxHistoryLimit = 1000
	// DefaultTimeout bounds a batch, a broadcast or a history read.
	DefaultTimeout = fabric.DefaultPublishTimeout
	// DefaultPrefix is the path under which methods are served.
	DefaultPrefix = "/api/"
)

// Bounds of the fields of requests.
const (
	// MaxUserLength is the longest user id accepted, in bytes.
	MaxUserLength = 1024
	// MaxReasonLength is the longest close reason accepted, in bytes (what
	// a WebSocket close frame carries).
	MaxReasonLength = 123
	// MaxPatternLength is the longest channels pattern accepted, in bytes.
	MaxPatternLength = 1024
)

// Options configures New. Node is required.
type Options struct {
	// Node publishes and reads history.
	Node *fabric.Node
	// Cluster answers channels, info, disconnect and unsubscribe; nil
	// answers them NOT_ENABLED.
	Cluster fabric.ClusterView
	// Presence answers presence; nil answers it NOT_ENABLED.
	Presence *fabric.Presence
	// Key, when set, is required as "Authorization: Bearer <Key>". When it
	// is empty, only local callers may call: a loopback peer, not behind a
	// proxy (a request with forwarding headers is never local), sending
	// Content-Type application/json and no browser Origin — so that a web
	// page can never reach the key-less API, cross-site or by DNS
	// rebinding.
	Key string
	// Proxies decides whose X-Forwarded-For counts (nil: nobody's).
	Proxies *fabric.ProxyPolicy
	// MaxBody bounds the request body in bytes (default DefaultMaxBody).
	MaxBody int64
	// MaxBatch bounds the messages of a batch and the topics of a
	// broadcast (default DefaultMaxBatch).
	MaxBatch int
	// MaxHistoryLimit bounds the messages of a history answer (default
	// DefaultMaxHistoryLimit).
	MaxHistoryLimit int
	// Timeout bounds a batch, a broadcast or a history read as a whole
	// (default DefaultTimeout). A single publish is bounded by the node's
	// PublishTimeout, cluster calls by the cluster view's own timeout.
	Timeout time.Duration
	// Prefix is the path before the method name, as the handler sees it
	// (after any http.StripPrefix); default "/api/".
	Prefix string
	// Logger receives failures; nil uses the node's logger.
	Logger *slog.Logger
}

// Error codes, each with its HTTP status.
const (
	// CodeBadRequest (400): the body is not a JSON object of the method's
	// shape, or a field has a wrong type or value.
	CodeBadRequest = "BAD_REQUEST"
	// CodeInvalidTopic (400): a topic fails fabric.ValidateTopic.
	CodeInvalidTopic = "INVALID_TOPIC"
	// CodeReservedTopic (400): a publish to a system topic (prefix "__").
	CodeReservedTopic = "RESERVED_TOPIC"
	// CodeInvalidEvent (400): an event fails fabric.ValidateEvent.
	CodeInvalidEvent = "INVALID_EVENT"
	// CodeNoHistory (400): "persist" on a node without a history backend.
	CodeNoHistory = "NO_HISTORY"
	// CodeUnauthorized (401): a key is configured and the request lacks it.
	CodeUnauthorized = "UNAUTHORIZED"
	// CodeForbidden (403): no key is configured and the peer is not loopback.
	CodeForbidden = "FORBIDDEN"
	// CodeNotFound (404): no such method.
	CodeNotFound = "NOT_FOUND"
	// CodeNotEnabled (404): the method needs a part this server does not
	// run (history, presence, cluster view).
	CodeNotEnabled = "NOT_ENABLED"
	// CodeMethodNotAllowed (405): the HTTP method is not POST.
	CodeMethodNotAllowed = "METHOD_NOT_ALLOWED"
	// CodePayloadTooLarge (413): the body is larger than MaxBody.
	CodePayloadTooLarge = "PAYLOAD_TOO_LARGE"
	// CodeTooManyItems (413): a batch or broadcast over MaxBatch.
	CodeTooManyItems = "TOO_MANY_ITEMS"
	// CodeInternal (500): an unexpected failure (logged).
	CodeInternal = "INTERNAL"
	// CodeUnavailable (503): the backend cannot do it now (NATS or
	// JetStream unreachable, no leader, timeout, node closing): retry.
	CodeUnavailable = "UNAVAILABLE"
)

// Status returns the HTTP status of an error code (500 for an unknown one).
func Status(code string) int {
	switch code {
	case CodeBadRequest, CodeInvalidTopic, CodeReservedTopic, CodeInvalidEvent, CodeNoHistory:
		return http.StatusBadRequest
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeForbidden:
		return http.StatusForbidden
	case CodeNotFound, CodeNotEnabled:
		return http.StatusNotFound
	case CodeMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case CodePayloadTooLarge, CodeTooManyItems:
		return http.StatusRequestEntityTooLarge
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// Error is a failed call: its code and a message for people.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func newError(code, msg string) *Error { return &Error{Code: code, Message: msg} }

// handler serves the API.
type handler struct {
	node     *fabric.Node
	cluster  fabric.ClusterView
	presence *fabric.Presence
	key      []byte
	opts     Options
	log      *slog.Logger
	ct       []string // the Content-Type header value, shared by every answer
	bufs     sync.Pool
}

// scratch is one request's reusable memory.
type scratch struct {
	body []byte
	out  []byte
	msgs []message
}

// maxPooled is the largest buffer kept for reuse.
const maxPooled = 256 << 10

// New returns the API handler. It panics without a Node, like a mux given
// a nil handler.
func New(o Options) http.Handler {
	if o.Node == nil {
		panic("api: Options.Node is required")
	}
	if o.MaxBody <= 0 {
		o.MaxBody = DefaultMaxBody
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.MaxHistoryLimit <= 0 {
		o.MaxHistoryLimit = DefaultMaxHistoryLimit
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	h := &handler{node: o.Node, cluster: o.Cluster, presence: o.Presence, opts: o, log: o.Logger,
		ct: []string{"application/json"}}
	if o.Key != "" {
		h.key = []byte(o.Key)
	}
	if h.log == nil {
		h.log = o.Node.Logger()
	}
	h.bufs.New = func() any { return &scratch{body: make([]byte, 0, 4096), out: make([]byte, 0, 512)} }
	return h
}

// ServeHTTP implements http.Handler.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header()["Allow"] = []string{http.MethodPost}
		h.fail(w, nil, newError(CodeMethodNotAllowed, "use POST"))
		return
	}
	if e := h.authorize(r); e != nil {
		h.fail(w, nil, e)
		return
	}
	name, ok := strings.CutPrefix(r.URL.Path, h.opts.Prefix)
	m := methodOf(name)
	if !ok || m == nil {
		h.fail(w, nil, newError(CodeNotFound, "no API method "+quote(name)))
		return
	}
	s := h.bufs.Get().(*scratch)
	defer h.release(s)
	if e := h.readBody(r, s); e != nil {
		h.fail(w, s, e)
		return
	}
	s.out = append(s.out[:0], `{"ok":true`...)
	if e := m(h, r.Context(), s); e != nil {
		h.fail(w, s, e)
		return
	}
	s.out = append(s.out, '}')
	h.write(w, http.StatusOK, s.out)
}

// method runs one API method on the body in s.body, appending the fields of
// its answer to s.out.
type method func(h *handler, ctx context.Context, s *scratch) *Error

func methodOf(name string) method {
	switch name {
	case "publish":
		return (*handler).publish
	case "batch":
		return (*handler).batch
	case "broadcast":
		return (*handler).broadcast
	case "history":
		return (*handler).history
	case "presence":
		return (*handler).presenceList
	case "channels":
		return (*handler).channels
	case "info":
		return (*handler).info
	case "disconnect":
		return (*handler).disconnect
	case "unsubscribe":
		return (*handler).unsubscribe
	}
	return nil
}

func (h *handler) release(s *scratch) {
	if cap(s.body) > maxPooled || cap(s.out) > maxPooled || cap(s.msgs) > DefaultMaxBatch {
		return
	}
	clear(s.msgs[:cap(s.msgs)]) // drop the strings of the last request
	s.msgs = s.msgs[:0]
	h.bufs.Put(s)
}

// authorize applies the key rule, or without a key the loopback rule.
func (h *handler) authorize(r *http.Request) *Error {
	if h.key != nil {
		got := r.Header.Get("Authorization")
		const scheme = "Bearer "
		if len(got) < len(scheme) || !strings.EqualFold(got[:len(scheme)], scheme) ||
			subtle.ConstantTimeCompare([]byte(got[len(scheme):]), h.key) != 1 {
			return newError(CodeUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)")
		}
		return nil
	}
	if !h.opts.Proxies.IsLoopback(r) {
		return newError(CodeForbidden, "calls from other hosts, or through a proxy, need an API key (--api-key)")
	}
	// A browser page must never reach the key-less API: a browser sends an
	// Origin (or Sec-Fetch-Site) with every cross-site POST, and cannot
	// send Content-Type application/json cross-site without a preflight
	// this handler never answers.
	if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") == "cross-site" {
		return newError(CodeForbidden, "browser requests need an API key (--api-key)")
	}
	if ct := r.Header.Get("Content-Type"); !isJSONContentType(ct) {
		return newError(CodeForbidden, "calls without an API key must send Content-Type: application/json")
	}
	return nil
}

// isJSONContentType reports application/json, with parameters or not.
func isJSONContentType(ct string) bool {
	mt, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "application/json")
}

// readBody reads the request body into s.body, at most MaxBody bytes.
func (h *handler) readBody(r *http.Request, s *scratch) *Error {
	limit := h.opts.MaxBody
	tooLarge := func() *Error {
		return newError(CodePayloadTooLarge, "body larger than "+itoa(limit)+" bytes")
	}
	if r.ContentLength > limit {
		return tooLarge()
	}
	b := s.body[:0]
	if r.ContentLength > 0 && int64(cap(b)) <= r.ContentLength {
		b = make([]byte, 0, r.ContentLength+1) // room to read the end
	}
	defer func() { s.body = b }()
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		// Read at most one byte past the limit: enough to know it was passed.
		end := int(min(int64(cap(b)), limit+1))
		n, err := r.Body.Read(b[len(b):end])
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return tooLarge()
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				return tooLarge()
			}
			return newError(CodeBadRequest, "reading the body: "+err.Error())
		}
	}
}

// fail answers with e.
func (h *handler) fail(w http.ResponseWriter, s *scratch, e *Error) {
	var out []byte
	if s != nil {
		out = s.out[:0]
	}
	out = appendError(append(out, '{'), e)
	out = append(out, '}')
	if s != nil {
		s.out = out
	}
	h.write(w, Status(e.Code), out)
}

func (h *handler) write(w http.ResponseWriter, status int, body []byte) {
	hd := w.Header()
	hd["Content-Type"] = h.ct
	if len(body) >= 2048 { // net/http would chunk it: say its length instead
		hd["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// appendError appends "error":{"code":...,"message":...}.
func appendError(out []byte, e *Error) []byte {
	out = append(out, `"error":{"code":`...)
	out = appendString(out, e.Code)
	out = append(out, `,"message":`...)
	out = appendString(out, e.Message)
	return append(out, '}')
}

// unavailable is the error of a backend call that failed: UNAVAILABLE
// (retry later), logged.
func (h *handler) unavailable(what string, err error) *Error {
	h.log.Warn("api: "+what+" failed", "err", err)
	return newError(CodeUnavailable, what+" failed: "+err.Error())
}

// internal is the error of a call that should not fail: INTERNAL, logged,
// unless the backend said to retry (UNAVAILABLE).
func (h *handler) internal(what string, err error) *Error {
	switch {
	case errors.Is(err, fabric.ErrBackendUnavailable), errors.Is(err, fabric.ErrNodeClosed),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return h.unavailable(what, err)
	}
	h.log.Error("api: "+what+" failed", "err", err)
	return newError(CodeInternal, what+" failed")
}
