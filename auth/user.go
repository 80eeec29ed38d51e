package auth

import (
	"encoding/json"
	"strings"
	"time"
)

// SubPlaceholder in a permission or policy pattern stands for the user id
// (the token's sub), matched literally: "user:${sub}" is "user:ada" for
// Ada, whatever characters her id has.
const SubPlaceholder = "${sub}"

// Permissions are what a connection may do, as globs where '*' stands for
// any run of characters (see fabric.MatchTopics) and ${sub} for the user
// id. They are the "subscribe", "publish" and "rpc" members of the token's
// fabric claim.
type Permissions struct {
	// Subscribe lists the topics the connection may read (subscribe,
	// history, presence) where a topic's rule is "token".
	Subscribe []string `json:"subscribe,omitempty"`
	// Publish lists the topics the connection may publish to (the
	// fabric/publish call).
	Publish []string `json:"publish,omitempty"`
	// RPC lists the RPC paths the connection may call ("chat/*").
	RPC []string `json:"rpc,omitempty"`
}

// claim is the fabric claim: permissions and presence info.
type claim struct {
	Permissions
	Info json.RawMessage `json:"info,omitempty"`
}

// User is the user data of a connection the Verifier accepted: the
// verified token's subject, expiry, permissions and presence info, or an
// anonymous connection's (no subject, the anonymous permissions). It
// implements fabric.Expirer, and UserID makes fabric.UserKey see the
// subject. It is immutable; a refresh makes a new one.
type User struct {
	sub      string
	exp      time.Time
	info     json.RawMessage
	claims   map[string]any
	read     globs
	pub      globs
	rpc      globs
	anonKey  string // "anon:<random>" for anonymous connections
	perms    Permissions
	issuedAt time.Time
}

// newUser builds the user of verified claims.
func newUser(sub string, exp, iat time.Time, c claim, claims map[string]any) *User {
	u := &User{sub: sub, exp: exp, issuedAt: iat, info: c.Info, claims: claims, perms: c.Permissions}
	u.compile()
	return u
}

func (u *User) compile() {
	u.read = compileGlobs(u.perms.Subscribe, u.sub)
	u.pub = compileGlobs(u.perms.Publish, u.sub)
	u.rpc = compileGlobs(u.perms.RPC, u.sub)
}

// UserID returns the token's subject ("" for an anonymous connection).
func (u *User) UserID() string { return u.sub }

// Anonymous reports whether the connection has no token.
func (u *User) Anonymous() bool { return u.sub == "" }

// ExpiresAt returns the token's expiry (zero: it never expires, as an
// anonymous connection or a token without exp).
func (u *User) ExpiresAt() time.Time { return u.exp }

// IssuedAt returns the token's iat (zero when it has none).
func (u *User) IssuedAt() time.Time { return u.issuedAt }

// Info returns the fabric claim's "info" member as JSON (null when there is
// none): what presence shows of the user.
func (u *User) Info() json.RawMessage {
	if len(u.info) == 0 {
		return json.RawMessage("null")
	}
	return u.info
}

// Claims returns every claim of the token (nil for an anonymous
// connection). The map must not be modified.
func (u *User) Claims() map[string]any { return u.claims }

// Permissions returns the connection's permissions as the token gave them
// (${sub} not yet expanded).
func (u *User) Permissions() Permissions { return u.perms }

// CanSubscribe reports whether the token's subscribe patterns match topic.
func (u *User) CanSubscribe(topic string) bool { return u.read.match(topic) }

// CanPublish reports whether the token's publish patterns match topic.
func (u *User) CanPublish(topic string) bool { return u.pub.match(topic) }

// CanCall reports whether the token's rpc patterns match path.
func (u *User) CanCall(path string) bool { return u.rpc.match(path) }

// PresenceKey returns the user's presence key: its id, or for an anonymous
// connection an opaque random key ("anon:<random>") of the connection.
func (u *User) PresenceKey() string {
	if u.sub != "" {
		return u.sub
	}
	return u.anonKey
}

// AuthUser returns u: user data of the application's own type that embeds
// a *User keeps the hooks of this package working.
func (u *User) AuthUser() *User { return u }

// authUser is user data that carries a *User (a *User, or a struct
// embedding one).
type authUser interface{ AuthUser() *User }

// UserOf returns the *User of a connection's user data, or nil when it
// carries none.
func UserOf(userData any) *User {
	if a, ok := userData.(authUser); ok {
		return a.AuthUser()
	}
	return nil
}

// glob is a compiled pattern: the literal parts between its stars.
type glob struct{ parts []string }

type globs []glob

func (gs globs) match(s string) bool {
	for _, g := range gs {
		if g.match(s) {
			return true
		}
	}
	return false
}

func compileGlobs(patterns []string, sub string) globs {
	out := make(globs, 0, len(patterns))
	for _, p := range patterns {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		if strings.Contains(p, SubPlaceholder) && sub == "" {
			continue // a per-user pattern grants an anonymous connection nothing
		}
		out = append(out, compileGlob(p, sub))
	}
	return out
}

// compileGlob compiles pattern, whose '*' stands for any run of characters
// and whose ${sub} stands for sub literally (a '*' in sub is no wildcard).
func compileGlob(pattern, sub string) glob {
	var parts []string
	cur := ""
	for i, chunk := range strings.Split(pattern, SubPlaceholder) {
		if i > 0 {
			cur += sub
		}
		for j, piece := range strings.Split(chunk, "*") {
			if j > 0 {
				parts = append(parts, cur)
				cur = ""
			}
			cur += piece
		}
	}
	return glob{parts: append(parts, cur)}
}

// match reports whether s matches: the first part is a prefix, the last a
// suffix, and the ones between appear in order (leftmost first, which is
// optimal for '*'-only globs), in linear time.
func (g glob) match(s string) bool {
	ps := g.parts
	if len(ps) == 1 {
		return s == ps[0]
	}
	first, last := ps[0], ps[len(ps)-1]
	if len(s) < len(first)+len(last) || !strings.HasPrefix(s, first) || !strings.HasSuffix(s, last) {
		return false
	}
	s = s[len(first) : len(s)-len(last)]
	for _, p := range ps[1 : len(ps)-1] {
		i := strings.Index(s, p)
		if i < 0 {
			return false
		}
		s = s[i+len(p):]
	}
	return true
}

// MatchPattern reports whether s matches pattern for the user sub: '*'
// stands for any run of characters, ${sub} for sub literally. A pattern
// with ${sub} matches nothing for an empty sub.
func MatchPattern(pattern, sub, s string) bool {
	if strings.Contains(pattern, SubPlaceholder) && sub == "" {
		return false
	}
	return compileGlob(pattern, sub).match(s)
}
