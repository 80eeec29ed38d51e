package auth

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/fabricrt/fabric/fabric"
)

// Hooks returns the Verifier's session hooks: Connect, Refresh, Subscribe
// and Publish. Gate RPC calls with BeforeExecute (fabric.Config) and key
// presence with PresenceKey and PresenceSelect (fabric.PresenceOptions).
func (v *Verifier) Hooks() fabric.Hooks {
	return fabric.Hooks{Connect: v.Connect, Refresh: v.Refresh, Subscribe: v.Subscribe, Publish: v.Publish}
}

// TokenFrom returns the token of a connection request: the Authorization
// header's Bearer token, else the token query parameter, else the cookie
// (explicit credentials before the ambient one); "" when there is none.
func TokenFrom(r *http.Request, cookie string) string {
	if h := r.Header.Get("Authorization"); h != "" {
		if scheme, tok, ok := strings.Cut(h, " "); ok && strings.EqualFold(scheme, "Bearer") {
			if tok = strings.TrimSpace(tok); tok != "" {
				return tok
			}
		}
	}
	if tok := r.URL.Query().Get("token"); tok != "" {
		return tok
	}
	if cookie != "" {
		if c, err := r.Cookie(cookie); err == nil && c.Value != "" {
			return c.Value
		}
	}
	return ""
}

// Connect is a fabric Connect hook: it verifies the request's token (see
// TokenFrom) and returns its *User. Without a token the request is refused
// with 401, or let in as an anonymous *User with AllowAnonymous; a token
// that does not verify is refused with 401 and a short reason ("invalid
// token: token expired"), never the token.
func (v *Verifier) Connect(r *http.Request) (any, error) {
	tok := TokenFrom(r, v.opts.Cookie)
	if tok == "" {
		if v.opts.AllowAnonymous {
			return v.anonymous(), nil
		}
		return nil, &fabric.StatusError{Status: http.StatusUnauthorized, Message: ReasonMissing}
	}
	u, err := v.Verify(tok)
	if err != nil {
		return nil, &fabric.StatusError{Status: http.StatusUnauthorized, Message: "invalid token: " + tokenReason(err)}
	}
	return u, nil
}

func tokenReason(err error) string {
	var te *TokenError
	if errors.As(err, &te) {
		return te.Reason
	}
	return ReasonInvalidClaims
}

// Refresh is a fabric Refresh hook: it verifies token and returns its user
// when it names the connection's user (fabric.ErrTokenUserChanged
// otherwise, anonymous connections included). A token that does not verify
// is refused with UNAUTHENTICATED.
func (v *Verifier) Refresh(c *fabric.Client, token string) (any, error) {
	u, err := v.Verify(token)
	if err != nil {
		return nil, fabric.NewLiveError(fabric.CodeUnauthenticated, tokenReason(err))
	}
	old := UserOf(c.UserData())
	if old == nil || old.sub == "" || old.sub != u.sub {
		return nil, fabric.ErrTokenUserChanged
	}
	return u, nil
}

// Readable is user data that decides the topics it may read under
// RuleToken (*User does, with its token's subscribe patterns).
type Readable interface {
	CanSubscribe(topic string) bool
}

// CanRead reports why the connection whose user data is userData may not
// read topic (subscribe, history, presence; __presence:T and __replay:T
// are judged as T), or nil when it may. It applies the topic's read rule
// (Options.ReadPolicy) and counts nothing.
func (v *Verifier) CanRead(userData any, topic string) error {
	topic = stripSystem(topic)
	rp := ReadPolicy{Rule: RuleToken}
	if v.opts.ReadPolicy != nil {
		rp = v.opts.ReadPolicy(topic)
	}
	switch rp.Rule {
	case RulePublic:
		return nil
	case RuleUser:
		if MatchPattern(rp.Pattern, userID(userData), topic) {
			return nil
		}
		return fabric.NewLiveError(fabric.CodeForbidden, "this topic belongs to another user")
	case RuleToken, "":
		if r, ok := userData.(Readable); ok && r.CanSubscribe(topic) {
			return nil
		}
		return fabric.NewLiveError(fabric.CodeForbidden, "the token does not allow reading this topic")
	}
	return fabric.NewLiveError(fabric.CodeForbidden, "unknown read rule")
}

// userID is the id a RuleUser topic must hold: a *User's subject, else
// what fabric.UserKey finds in foreign user data.
func userID(userData any) string {
	if u := UserOf(userData); u != nil {
		return u.sub
	}
	k, _ := fabric.UserKey(userData)
	return k
}

// Subscribe is a fabric Subscribe hook (subscribes, replays, history and
// presence reads): the topic's read rule decides (see CanRead). A refusal
// is FORBIDDEN (the session layer counts it toward fabric.Limits.MaxDenials
// and closes a connection refused that often with 4403).
func (v *Verifier) Subscribe(c *fabric.Client, topic string) error {
	return v.CanRead(c.UserData(), topic)
}

// Publish is a fabric Publish hook: the token's publish patterns must match
// the topic (anonymous connections: Options.Anonymous). A refusal is
// FORBIDDEN.
func (v *Verifier) Publish(c *fabric.Client, topic, _ string) error {
	if u := UserOf(c.UserData()); u != nil && u.CanPublish(topic) {
		return nil
	}
	return fabric.NewLiveError(fabric.CodeForbidden, "the token does not allow publishing to this topic")
}

// BeforeExecute is a fabric.Config.BeforeExecute: the token's rpc patterns
// must match the call's path (anonymous connections: Options.Anonymous).
// The client publish call (fabric.PublishRPCPath) is left to Publish. A
// refusal is FORBIDDEN.
func (v *Verifier) BeforeExecute(_ context.Context, call *fabric.Call) error {
	if call.Path == fabric.PublishRPCPath || call.Client == nil {
		return nil
	}
	if u := UserOf(call.Client.UserData()); u != nil && u.CanCall(call.Path) {
		return nil
	}
	return fabric.NewLiveError(fabric.CodeForbidden, "the token does not allow this call")
}

// PresenceKey is a fabric.PresenceOptions.Key: a user's connections (tabs,
// instances) count as one member keyed by its id; an anonymous connection
// is a member of its own under an opaque random key ("anon:<random>"),
// never its instance or connection id.
func (v *Verifier) PresenceKey(c *fabric.Client) string {
	ud := c.UserData()
	if u := UserOf(ud); u != nil {
		return u.PresenceKey()
	}
	if k, ok := fabric.UserKey(ud); ok {
		return k
	}
	return v.opaqueKey(fabric.ConnectionKey(c))
}

// PresenceSelect is a fabric.PresenceOptions.Select: a member's data is the
// token's info (null without one).
func (v *Verifier) PresenceSelect(userData any) any {
	if u := UserOf(userData); u != nil {
		return u.Info()
	}
	return nil
}

// stripSystem returns the topic a system topic is about: __presence:T and
// __replay:T are judged as T.
func stripSystem(topic string) string {
	if t, ok := strings.CutPrefix(topic, fabric.PresenceTopicPrefix); ok {
		return t
	}
	if t, ok := strings.CutPrefix(topic, fabric.ReplayTopicPrefix); ok {
		return t
	}
	return topic
}
