// Package auth authenticates Fabric connections with JSON Web Tokens and
// authorizes what they do with the permissions the token carries.
//
// A Verifier checks tokens with github.com/golang-jwt/jwt/v5 against its
// keys (HMAC secrets, RSA, EC and Ed25519 public keys from PEM files or a
// JWK Set, picked by kid), and provides the fabric.Hooks that use it:
// Connect (a token from the query, a cookie or an Authorization header),
// Refresh (a new token of the same user), Subscribe and Publish (the
// token's topic patterns, or per-topic read rules), BeforeExecute (the
// token's RPC patterns), and a presence Key and Select (members keyed by
// user id, with the token's info as their data). The verified user data is
// a *User. docs/auth.md describes the claims, the rules and the options.
//
//	v, err := auth.NewVerifier(auth.Options{Secrets: []string{secret}})
//	if err != nil { ... }
//	node, err := fabric.NewNode(fabric.Config{Hooks: v.Hooks(), BeforeExecute: v.BeforeExecute, ...})
package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Defaults of Options (zero values take these).
const (
	// DefaultClaim is the claim that carries permissions and presence info.
	DefaultClaim = "fabric"
	// DefaultCookie is the cookie Connect reads a token from.
	DefaultCookie = "fabric_token"
	// DefaultLeeway is the clock skew tolerated on exp, nbf and iat.
	DefaultLeeway = 5 * time.Second
	// MaxTokenBytes is the longest token accepted.
	MaxTokenBytes = 16 << 10
)

// Options configures NewVerifier. At least one key is required: Secrets,
// KeyFiles, JWKSFile or Keys.
type Options struct {
	// Secrets are HMAC secrets (HS256; HS384 and HS512 too for secrets of
	// 48 and 64 bytes or more), at least 32 bytes each, without kid.
	Secrets []string
	// KeyFiles are files of public keys, read by LoadKeyFile (PEM keys or
	// certificates, or a JWK Set), re-read by Reload. Their PEM keys have
	// no kid.
	KeyFiles []string
	// JWKSFile is a JWK Set file ({"keys":[...]}), re-read by Reload:
	// rotate keys by adding the new kid, then removing the old one.
	JWKSFile string
	// Keys are more keys, given in Go.
	Keys []Key
	// Issuer, when set, must be the token's iss.
	Issuer string
	// Audience, when set, must hold one of the token's aud.
	Audience []string
	// Claim names the claim carrying permissions and presence info
	// (default "fabric").
	Claim string
	// Cookie names the cookie Connect reads a token from (default
	// "fabric_token").
	Cookie string
	// Leeway is the clock skew tolerated on exp, nbf and iat (default 5s;
	// negative: none).
	Leeway time.Duration
	// ExpOptional accepts tokens without exp (they never expire); by
	// default exp is required.
	ExpOptional bool
	// AllowAnonymous lets connections without a token in, as anonymous
	// users with the Anonymous permissions (a token that fails to verify
	// is still refused).
	AllowAnonymous bool
	// Anonymous are the permissions of anonymous connections (${sub}
	// patterns grant them nothing).
	Anonymous Permissions
	// ReadPolicy returns the read rule of a topic (subscribe, history,
	// presence); nil: RuleToken for every topic.
	ReadPolicy func(topic string) ReadPolicy
	// Now is the clock (default time.Now); for tests.
	Now func() time.Time
}

// Rule is a topic's read rule: who may subscribe to it, read its history
// and see its presence.
type Rule string

// Read rules.
const (
	// RuleToken: the token's subscribe patterns must match the topic.
	RuleToken Rule = "token"
	// RulePublic: anyone may read, anonymous connections included.
	RulePublic Rule = "public"
	// RuleUser: the topic must match the policy's pattern with ${sub}
	// standing for the reader's own id ("user:${sub}": only Ada reads
	// user:ada).
	RuleUser Rule = "user"
)

// ReadPolicy is the read rule of one topic.
type ReadPolicy struct {
	Rule Rule
	// Pattern is the policy's pattern, with ${sub}, for RuleUser.
	Pattern string
}

// Reasons a token is refused (TokenError.Reason): short, safe to show.
const (
	ReasonMissing       = "token required"
	ReasonTooLarge      = "token too large"
	ReasonMalformed     = "malformed token"
	ReasonAlgorithm     = "algorithm not allowed"
	ReasonUnknownKey    = "no key for this token"
	ReasonSignature     = "bad signature"
	ReasonExpired       = "token expired"
	ReasonNotYetValid   = "token not valid yet"
	ReasonIssuedFuture  = "token issued in the future"
	ReasonNoExp         = "token has no exp"
	ReasonIssuer        = "wrong issuer"
	ReasonAudience      = "wrong audience"
	ReasonNoSubject     = "token has no sub"
	ReasonClaim         = "bad permissions claim"
	ReasonInvalidClaims = "invalid claims"
)

// TokenError is a refused token: Reason is one of the Reason constants
// (it never holds any part of the token), Err the verifier's detail.
type TokenError struct {
	Reason string
	Err    error
}

func (e *TokenError) Error() string {
	if e.Err == nil {
		return "auth: " + e.Reason
	}
	return "auth: " + e.Reason + ": " + e.Err.Error()
}

func (e *TokenError) Unwrap() error { return e.Err }

var errNoKey = errors.New("no key verifies this algorithm and kid")

// Verifier verifies tokens and provides the hooks that use them. It is
// safe for concurrent use; Reload swaps its keys atomically.
type Verifier struct {
	opts    Options
	static  []Key
	keys    atomic.Pointer[keySet]
	reload  sync.Mutex
	anonKey []byte // keys the anonymous presence keys of foreign user data
	now     func() time.Time
}

// NewVerifier checks opts and loads every key.
func NewVerifier(opts Options) (*Verifier, error) {
	if opts.Claim == "" {
		opts.Claim = DefaultClaim
	}
	if opts.Cookie == "" {
		opts.Cookie = DefaultCookie
	}
	if opts.Leeway == 0 {
		opts.Leeway = DefaultLeeway
	} else if opts.Leeway < 0 {
		opts.Leeway = 0
	}
	v := &Verifier{opts: opts, now: opts.Now, anonKey: make([]byte, 32)}
	if v.now == nil {
		v.now = time.Now
	}
	_, _ = rand.Read(v.anonKey) // never fails (crypto/rand)
	for i, s := range opts.Secrets {
		if s == "" {
			return nil, fmt.Errorf("auth: secret %d is empty", i)
		}
		v.static = append(v.static, Key{Key: []byte(s)})
	}
	v.static = append(v.static, opts.Keys...)
	if err := v.Reload(); err != nil {
		return nil, err
	}
	return v, nil
}

// Reload re-reads the key files and the JWK Set file and swaps the keys in
// at once (tokens are then verified with the new set). On error the keys
// in use stay.
func (v *Verifier) Reload() error {
	v.reload.Lock()
	defer v.reload.Unlock()
	keys := append([]Key(nil), v.static...)
	for _, f := range v.opts.KeyFiles {
		ks, err := LoadKeyFile(f)
		if err != nil {
			return err
		}
		keys = append(keys, ks...)
	}
	if f := v.opts.JWKSFile; f != "" {
		ks, err := LoadKeyFile(f)
		if err != nil {
			return err
		}
		keys = append(keys, ks...)
	}
	set, err := newKeySet(keys)
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	set.parser = v.parser(set.methods)
	v.keys.Store(set)
	return nil
}

// parser is the token parser for a key set's algorithms.
func (v *Verifier) parser(methods []string) *jwt.Parser {
	o := []jwt.ParserOption{
		jwt.WithValidMethods(methods), // never "none", never an algorithm no key has
		jwt.WithLeeway(v.opts.Leeway),
		jwt.WithIssuedAt(),
		jwt.WithTimeFunc(v.now),
	}
	if !v.opts.ExpOptional {
		o = append(o, jwt.WithExpirationRequired())
	}
	if v.opts.Issuer != "" {
		o = append(o, jwt.WithIssuer(v.opts.Issuer))
	}
	if len(v.opts.Audience) > 0 {
		o = append(o, jwt.WithAudience(v.opts.Audience...))
	}
	return jwt.NewParser(o...)
}

// Algorithms returns the algorithms the current keys verify.
func (v *Verifier) Algorithms() []string {
	return append([]string(nil), v.keys.Load().methods...)
}

// Verify checks token (signature, algorithm, exp, nbf, iat, iss, aud, sub
// and the permissions claim) and returns its user. A refusal is a
// *TokenError.
func (v *Verifier) Verify(token string) (*User, error) {
	if token == "" {
		return nil, &TokenError{Reason: ReasonMissing}
	}
	if len(token) > MaxTokenBytes {
		return nil, &TokenError{Reason: ReasonTooLarge}
	}
	ks := v.keys.Load()
	claims := jwt.MapClaims{}
	keyed := false
	_, err := ks.parser.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		keyed = true
		kid, _ := t.Header["kid"].(string)
		keys := ks.candidates(t.Method.Alg(), kid)
		if len(keys) == 0 {
			return nil, errNoKey
		}
		return jwt.VerificationKeySet{Keys: keys}, nil
	})
	if err != nil {
		return nil, &TokenError{Reason: reason(err, keyed, claims), Err: err}
	}
	sub, _ := claims["sub"].(string)
	if sub == "" {
		return nil, &TokenError{Reason: ReasonNoSubject}
	}
	var exp, iat time.Time
	if d, err := claims.GetExpirationTime(); err == nil && d != nil {
		exp = d.Time
	}
	if d, err := claims.GetIssuedAt(); err == nil && d != nil {
		iat = d.Time
	}
	var c claim
	if raw, ok := claims[v.opts.Claim]; ok && raw != nil {
		b, err := json.Marshal(raw)
		if err == nil {
			err = json.Unmarshal(b, &c)
		}
		if err != nil {
			return nil, &TokenError{Reason: ReasonClaim, Err: fmt.Errorf("claim %q: %w", v.opts.Claim, err)}
		}
	}
	return newUser(sub, exp, iat, c, claims), nil
}

// reason maps a parse error to a Reason.
func reason(err error, keyed bool, claims jwt.MapClaims) string {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return ReasonMalformed
	case !keyed && (errors.Is(err, jwt.ErrTokenSignatureInvalid) || errors.Is(err, jwt.ErrTokenUnverifiable)):
		return ReasonAlgorithm // refused before any key was looked up
	case errors.Is(err, errNoKey):
		return ReasonUnknownKey
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrTokenUnverifiable):
		return ReasonSignature
	case errors.Is(err, jwt.ErrTokenExpired):
		return ReasonExpired
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return ReasonNotYetValid
	case errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return ReasonIssuedFuture
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return ReasonIssuer
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return ReasonAudience
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		switch {
		case claims["exp"] == nil:
			return ReasonNoExp
		case claims["aud"] == nil:
			return ReasonAudience
		case claims["iss"] == nil:
			return ReasonIssuer
		}
	}
	return ReasonInvalidClaims
}

// anonymous returns the user data of a connection without a token.
func (v *Verifier) anonymous() *User {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	u := newUser("", time.Time{}, time.Time{}, claim{Permissions: v.opts.Anonymous}, nil)
	u.anonKey = "anon:" + hex.EncodeToString(b[:])
	return u
}

// opaqueKey is an anonymous presence key for a connection whose user data
// is not a *User: a keyed hash of its connection key, so that neither the
// instance nor the connection counter shows.
func (v *Verifier) opaqueKey(connKey string) string {
	m := hmac.New(sha256.New, v.anonKey)
	m.Write([]byte(connKey))
	return "anon:" + hex.EncodeToString(m.Sum(nil)[:16])
}
