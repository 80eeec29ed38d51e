package fabric

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"sync/atomic"
)

// Error codes understood by the svelte-realtime client (RpcError.code).
const (
	CodeInvalidRequest  = "INVALID_REQUEST"
	CodeNotFound        = "NOT_FOUND"
	CodeValidation      = "VALIDATION"
	CodeUnauthenticated = "UNAUTHENTICATED"
	CodeForbidden       = "FORBIDDEN"
	CodeRateLimited     = "RATE_LIMITED"
	CodeOverloaded      = "OVERLOADED"
	CodePayloadTooLarge = "PAYLOAD_TOO_LARGE"
	CodeInvalidTopic    = "INVALID_TOPIC"
	CodeInternal        = "INTERNAL_ERROR"
)

// RPCTopic is the topic on which RPC responses reach the client.
const RPCTopic = "__rpc"

// LiveError is an error whose code and message are shown to the client.
// Any other error a handler returns reaches the client as INTERNAL_ERROR
// with a generic message, so internals never leak.
type LiveError struct {
	Code    string `json:"code"`
	Message string `json:"error"`
	// Issues carries validation details (sent as "issues"), optional.
	Issues any `json:"issues,omitempty"`
	// RetryAfter, in milliseconds, is sent with RATE_LIMITED, optional.
	RetryAfter int64 `json:"retryAfter,omitempty"`
}

// NewLiveError returns a client-visible error.
func NewLiveError(code, message string) *LiveError {
	return &LiveError{Code: code, Message: message}
}

func (e *LiveError) Error() string { return e.Code + ": " + e.Message }

// Call is one RPC invocation.
type Call struct {
	// Client is the connection that made the call.
	Client *Client
	// Path is the handler path, e.g. "chat/send".
	Path string
	// ID is the client's correlation id ("" for fire-and-forget calls).
	ID string
	// Args are the call's arguments, undecoded.
	Args []json.RawMessage
}

// Arg decodes argument i into v; a missing or malformed argument is a
// VALIDATION LiveError.
func (c *Call) Arg(i int, v any) error {
	if i >= len(c.Args) {
		return NewLiveError(CodeValidation, fmt.Sprintf("missing argument %d", i))
	}
	if err := json.Unmarshal(c.Args[i], v); err != nil {
		return NewLiveError(CodeValidation, fmt.Sprintf("argument %d: %v", i, err))
	}
	return nil
}

// RPCHandler answers an RPC call; its result is sent to the client as JSON.
type RPCHandler func(ctx context.Context, call *Call) (any, error)

// RPCResult is the response to one call, in the svelte-realtime wire shape.
type RPCResult struct {
	ID         string `json:"id"`
	OK         bool   `json:"ok"`
	Data       any    `json:"data,omitempty"`
	Code       string `json:"code,omitempty"`
	Error      string `json:"error,omitempty"`
	Issues     any    `json:"issues,omitempty"`
	RetryAfter int64  `json:"retryAfter,omitempty"`
}

var rpcPathRe = regexp.MustCompile(`^[a-zA-Z0-9_-]+(?:/[a-zA-Z0-9_-]+)+$`)

type rpcMux struct {
	mu       sync.Mutex
	handlers atomic.Pointer[map[string]RPCHandler]
}

// HandleRPC registers h for path ("module/function", as svelte-realtime
// names them). Registering a path twice replaces the handler.
func (n *Node) HandleRPC(path string, h RPCHandler) {
	if !rpcPathRe.MatchString(path) {
		panic(fmt.Sprintf("fabric: invalid RPC path %q (want segments of [a-zA-Z0-9_-] joined by '/')", path))
	}
	if h == nil {
		panic("fabric: nil RPC handler")
	}
	m := &n.rpc
	m.mu.Lock()
	defer m.mu.Unlock()
	next := map[string]RPCHandler{}
	if cur := m.handlers.Load(); cur != nil {
		for k, v := range *cur {
			next[k] = v
		}
	}
	next[path] = h
	m.handlers.Store(&next)
}

func (m *rpcMux) lookup(path string) RPCHandler {
	if cur := m.handlers.Load(); cur != nil {
		return (*cur)[path]
	}
	return nil
}

// Execute runs one call through BeforeExecute and its handler and returns
// the response; it never panics on a handler's panic.
func (n *Node) Execute(ctx context.Context, call *Call) (res RPCResult) {
	res.ID = call.ID
	code := ""
	defer func() {
		if p := recover(); p != nil {
			n.log.Error("rpc handler panicked", "path", call.Path, "panic", p)
			res = RPCResult{ID: call.ID, Code: CodeInternal, Error: "Internal server error"}
		}
		code = res.Code
		if res.OK {
			code = "OK"
		}
		n.metrics.rpcCalls.WithLabelValues(code).Inc()
	}()
	if !rpcPathRe.MatchString(call.Path) {
		return RPCResult{ID: call.ID, Code: CodeInvalidRequest, Error: "Invalid path"}
	}
	h := n.rpc.lookup(call.Path)
	if h == nil {
		return RPCResult{ID: call.ID, Code: CodeNotFound, Error: "Not found"}
	}
	if n.cfg.BeforeExecute != nil {
		if err := n.cfg.BeforeExecute(ctx, call); err != nil {
			res := n.errorResult(call, err)
			n.metrics.Denials.WithLabelValues("rpc", res.Code).Inc()
			if call.Client != nil && (res.Code == CodeForbidden || res.Code == CodeUnauthenticated) {
				n.denied(call.Client)
			}
			return res
		}
	}
	data, err := h(ctx, call)
	if err != nil {
		return n.errorResult(call, err)
	}
	if data == nil {
		data = json.RawMessage("null")
	}
	return RPCResult{ID: call.ID, OK: true, Data: data}
}

func (n *Node) errorResult(call *Call, err error) RPCResult {
	var le *LiveError
	if errors.As(err, &le) {
		return RPCResult{ID: call.ID, Code: le.Code, Error: le.Message, Issues: le.Issues, RetryAfter: le.RetryAfter}
	}
	n.log.Warn("rpc handler failed", "path", call.Path, "err", err)
	return RPCResult{ID: call.ID, Code: CodeInternal, Error: "Internal server error"}
}

// PublishRPCPath is the path of the built-in client publish call:
// {"rpc":"fabric/publish","id":ID,"args":[topic,event,data]}. Every Node
// answers it; Hooks.Publish decides where a client may publish (nowhere
// without it). Reserved topics are always refused. The answer is
// {"seq":N} (N is 0 on a topic without history); rate limits set with
// Config.BeforeExecute apply to it as to any call.
const PublishRPCPath = "fabric/publish"

func (n *Node) publishRPC(ctx context.Context, call *Call) (any, error) {
	var topic, event string
	if err := call.Arg(0, &topic); err != nil {
		return nil, err
	}
	if err := call.Arg(1, &event); err != nil {
		return nil, err
	}
	if err := ValidateTopic(topic); err != nil {
		return nil, NewLiveError(CodeInvalidTopic, err.Error())
	}
	if err := ValidateEvent(event); err != nil {
		return nil, NewLiveError(CodeValidation, err.Error())
	}
	forbidden := NewLiveError(CodeForbidden, "publishing to "+clip(topic)+" is not allowed")
	h := n.cfg.Hooks.Publish
	if IsReserved(topic) || h == nil {
		return nil, forbidden
	}
	if err := h(call.Client, topic, event); err != nil {
		n.metrics.Denials.WithLabelValues("publish", refusalCode(err)).Inc()
		n.denied(call.Client)
		var le *LiveError
		if errors.As(err, &le) {
			return nil, le
		}
		return nil, forbidden
	}
	data := []byte("null")
	if len(call.Args) > 2 {
		data = call.Args[2] // raw JSON the client sent, checked by the decoder
	}
	seq, err := n.PublishEnvelope(ctx, topic, Envelope(topic, event, data))
	if err != nil {
		return nil, err
	}
	return map[string]uint64{"seq": seq}, nil
}
