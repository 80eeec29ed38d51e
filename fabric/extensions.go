package fabric

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// This file holds the helpers that wire the cluster-wide extensions (rate
// limiting, user keys) into a Node, whatever backend implements them.

// UserKey returns the user identity carried by a connection's user data (what
// the Upgrade hook returned): a non-empty string is the id itself; otherwise
// a UserID() or ID() string method, an "id" entry of a map[string]any, or an
// exported ID field of a struct (string or integer). ok is false for
// anonymous connections.
func UserKey(userData any) (key string, ok bool) {
	switch v := userData.(type) {
	case nil:
		return "", false
	case string:
		return v, v != ""
	case interface{ UserID() string }:
		k := v.UserID()
		return k, k != ""
	case interface{ ID() string }:
		k := v.ID()
		return k, k != ""
	case map[string]any:
		for _, name := range [...]string{"id", "ID", "userId", "userID"} {
			if k, ok := scalarKey(v[name]); ok {
				return k, true
			}
		}
		return "", false
	case map[string]string:
		k := v["id"]
		return k, k != ""
	}
	rv := reflect.ValueOf(userData)
	for rv.Kind() == reflect.Pointer {
		if rv.IsNil() {
			return "", false
		}
		rv = rv.Elem()
	}
	if rv.Kind() != reflect.Struct {
		return "", false
	}
	f := rv.FieldByName("ID")
	if !f.IsValid() || !f.CanInterface() {
		return "", false
	}
	return scalarKey(f.Interface())
}

func scalarKey(v any) (string, bool) {
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.String:
		return rv.String(), rv.Len() > 0
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return strconv.FormatInt(rv.Int(), 10), true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return strconv.FormatUint(rv.Uint(), 10), true
	case reflect.Float32, reflect.Float64:
		return strconv.FormatFloat(rv.Float(), 'f', -1, 64), true
	}
	return "", false
}

// ConnectionKey returns a cluster-unique key for one connection:
// "conn:" and 16 random hex digits, chosen when it connected. It says
// nothing about the instance or how many connections came before (presence
// lists show it for anonymous members).
func ConnectionKey(c *Client) string { return c.key }

// UserOrConnectionKey returns the connection's user key (see UserKey), or
// its ConnectionKey when it is anonymous.
func UserOrConnectionKey(c *Client) string {
	if k, ok := UserKey(c.UserData()); ok {
		return k
	}
	return ConnectionKey(c)
}

// KeyFunc picks the rate-limit key of a connection.
type KeyFunc func(c *Client) string

// KeyByIP keys by the peer's IP address ("ip:<addr>"). Behind a proxy that
// is the proxy's address: key by a forwarded address with a KeyFunc instead.
func KeyByIP(c *Client) string {
	host, _, err := net.SplitHostPort(c.remoteAddr)
	if err != nil {
		host = c.remoteAddr
	}
	return "ip:" + host
}

// KeyByConnection keys by the connection (see ConnectionKey).
func KeyByConnection(c *Client) string { return ConnectionKey(c) }

// KeyByUser keys by the authenticated user ("user:<key>"), or by the
// connection for anonymous ones.
func KeyByUser(c *Client) string {
	if k, ok := UserKey(c.UserData()); ok {
		return "user:" + k
	}
	return ConnectionKey(c)
}

// KeyByName returns the KeyFunc called name: "ip", "connection" or "user";
// ok is false for anything else.
func KeyByName(name string) (KeyFunc, bool) {
	switch strings.ToLower(name) {
	case "ip":
		return KeyByIP, true
	case "connection", "conn":
		return KeyByConnection, true
	case "user":
		return KeyByUser, true
	}
	return nil, false
}

// RateLimitedError is the client-visible error for a refused call: code
// RATE_LIMITED with retryAfter in milliseconds (at least 1).
func RateLimitedError(retryAfter time.Duration) *LiveError {
	ms := retryAfter.Milliseconds()
	if ms < 1 {
		ms = 1
	}
	return &LiveError{Code: CodeRateLimited, Message: "Too many requests", RetryAfter: ms}
}

// LimitRPC returns a Config.BeforeExecute that charges cost tokens per call
// to the key that key picks (KeyByUser when nil) and refuses the call with
// RATE_LIMITED once the key is out of tokens. next, if not nil, runs after
// an admitted call's charge.
func LimitRPC(l RateLimiter, key KeyFunc, cost int, next func(ctx context.Context, call *Call) error) func(ctx context.Context, call *Call) error {
	if key == nil {
		key = KeyByUser
	}
	return func(ctx context.Context, call *Call) error {
		allowed, _, reset, err := l.Consume(ctx, key(call.Client), cost)
		if !allowed {
			if err != nil {
				return err
			}
			return RateLimitedError(reset)
		}
		if next != nil {
			return next(ctx, call)
		}
		return nil
	}
}

// LimitMessages wraps an edge Message hook (client frames outside the
// protocol): each frame costs cost tokens of its key; a refused frame is not
// passed to next but to refused (which may be nil), with the time until the
// key's bucket refills.
func LimitMessages(l RateLimiter, key KeyFunc, cost int, next func(c *Client, data []byte, binary bool), refused func(c *Client, retryAfter time.Duration)) func(c *Client, data []byte, binary bool) {
	if key == nil {
		key = KeyByUser
	}
	return func(c *Client, data []byte, binary bool) {
		allowed, _, reset, _ := l.Consume(context.Background(), key(c), cost)
		if !allowed {
			if refused != nil {
				refused(c, reset)
			}
			return
		}
		if next != nil {
			next(c, data, binary)
		}
	}
}

// MatchTopics returns a predicate that reports whether a topic matches any
// of patterns, where '*' stands for any run of characters (including none)
// and every other character stands for itself: "room:*" matches "room:1"
// and "room:a/b". No patterns match nothing.
func MatchTopics(patterns []string) func(topic string) bool {
	ps := make([]string, 0, len(patterns))
	for _, p := range patterns {
		if p = strings.TrimSpace(p); p != "" {
			ps = append(ps, p)
		}
	}
	return func(topic string) bool {
		for _, p := range ps {
			if globMatch(p, topic) {
				return true
			}
		}
		return false
	}
}

// globMatch matches s against a pattern whose only wildcard is '*', in
// linear time (greedy with backtracking to the last star).
func globMatch(p, s string) bool {
	pi, si := 0, 0
	star, mark := -1, 0
	for si < len(s) {
		switch {
		case pi < len(p) && p[pi] == '*':
			star, mark = pi, si
			pi++
		case pi < len(p) && p[pi] == s[si]:
			pi++
			si++
		case star >= 0:
			pi = star + 1
			mark++
			si = mark
		default:
			return false
		}
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

// newConnectionKey returns "conn:" and 16 random hex digits.
func newConnectionKey() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "conn:" + hex.EncodeToString(b[:])
}
