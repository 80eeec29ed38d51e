package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/fabric"
)

// AuthOptions configures JWT authentication and authorization (package
// auth; docs/auth.md). It is on when a key is given (Secrets, KeyFiles,
// JWKSFile or Keys): every connection then needs a valid token (or is
// anonymous with AllowAnonymous), reads topics by their policy's Read rule
// (the token's subscribe patterns by default), publishes where the token's
// publish patterns allow and calls the RPC paths its rpc patterns allow.
//
// The application's hooks (Options.Hooks, Options.BeforeExecute) compose
// with it: its Connect and Refresh replace the auth ones (they make the
// user data: return a *auth.User, or a type embedding one, to keep the
// token permissions working); its Subscribe, Publish and BeforeExecute run
// after the auth check passed; Open, Message and Disconnect are the
// application's alone. Every refusal counts toward Limits.MaxDenials (the
// session layer closes a connection refused that often with 4403).
type AuthOptions struct {
	// Secrets are HMAC secrets (at least 32 bytes each).
	Secrets []string
	// KeyFiles are public key files: PEM keys or certificates, or a JWK
	// Set. Server.Reload (SIGHUP for `fabric serve`) re-reads them.
	KeyFiles []string
	// JWKSFile is a JWK Set file, re-read by Server.Reload: keys are picked
	// by kid, so rotation is adding the new key, then removing the old.
	JWKSFile string
	// Keys are more keys, given in Go.
	Keys []auth.Key
	// Issuer, when set, must be the token's iss.
	Issuer string
	// Audience, when set, must hold one of the token's aud.
	Audience []string
	// Claim names the claim carrying permissions and presence info
	// (default "fabric").
	Claim string
	// Cookie names the cookie a token may come in (default
	// "fabric_token"); the Authorization header (Bearer) and the token
	// query parameter work too.
	Cookie string
	// Leeway is the clock skew tolerated on exp, nbf and iat (default 5s;
	// negative: none).
	Leeway time.Duration
	// ExpOptional accepts tokens without exp (they never expire).
	ExpOptional bool
	// AllowAnonymous lets connections without a token in: they read
	// topics whose rule is public and do what Anonymous allows.
	AllowAnonymous bool
	// Anonymous are the permissions of anonymous connections (Go only).
	Anonymous auth.Permissions
}

// Enabled reports whether authentication is on: some key is given.
func (o *AuthOptions) Enabled() bool {
	return len(o.Secrets) > 0 || len(o.KeyFiles) > 0 || o.JWKSFile != "" || len(o.Keys) > 0
}

// withDefaults fills in the defaults (shown by the CLI whether auth is on
// or not).
func (o *AuthOptions) withDefaults() {
	if o.Claim == "" {
		o.Claim = auth.DefaultClaim
	}
	if o.Cookie == "" {
		o.Cookie = auth.DefaultCookie
	}
	if o.Leeway == 0 {
		o.Leeway = auth.DefaultLeeway
	}
}

// validateAuth reports auth settings that cannot work.
func (o *Options) validateAuth() error {
	a := &o.Auth
	if a.Enabled() {
		return nil
	}
	for i, p := range o.Topics {
		if r := strings.TrimSpace(p.Read); r != "" && r != ReadPublic {
			return fmt.Errorf("topics[%d] (%q): read: %s needs authentication (--jwt-secret, --jwt-key-file or --jwks-file)", i, p.Pattern, r)
		}
	}
	return nil
}

// wireAuth builds the verifier when auth is on and returns the node's
// hooks and RPC gate: the auth ones composed with the application's.
func (s *Server) wireAuth(hooks fabric.Hooks, next func(context.Context, *fabric.Call) error) (fabric.Hooks, func(context.Context, *fabric.Call) error, error) {
	o := s.opts.Auth
	if !o.Enabled() {
		return hooks, next, nil
	}
	v, err := auth.NewVerifier(auth.Options{
		Secrets:        o.Secrets,
		KeyFiles:       o.KeyFiles,
		JWKSFile:       o.JWKSFile,
		Keys:           o.Keys,
		Issuer:         o.Issuer,
		Audience:       o.Audience,
		Claim:          o.Claim,
		Cookie:         o.Cookie,
		Leeway:         o.Leeway,
		ExpOptional:    o.ExpOptional,
		AllowAnonymous: o.AllowAnonymous,
		Anonymous:      o.Anonymous,
		ReadPolicy:     s.policies.readPolicy,
	})
	if err != nil {
		return hooks, next, fmt.Errorf("server: %w", err)
	}
	s.auth = v
	app := hooks
	if app.Connect == nil {
		hooks.Connect = v.Connect
	}
	if app.Refresh == nil {
		hooks.Refresh = v.Refresh
	}
	hooks.Subscribe = func(c *fabric.Client, topic string) error {
		if err := v.Subscribe(c, topic); err != nil || app.Subscribe == nil {
			return err
		}
		return app.Subscribe(c, topic)
	}
	hooks.Publish = func(c *fabric.Client, topic, event string) error {
		if err := v.Publish(c, topic, event); err != nil || app.Publish == nil {
			return err
		}
		return app.Publish(c, topic, event)
	}
	gate := func(ctx context.Context, call *fabric.Call) error {
		if err := v.BeforeExecute(ctx, call); err != nil || next == nil {
			return err
		}
		return next(ctx, call)
	}
	s.log.Info("authentication on", "algorithms", v.Algorithms(), "anonymous", o.AllowAnonymous,
		"key_files", len(o.KeyFiles), "jwks", o.JWKSFile != "")
	return hooks, gate, nil
}

// Auth returns the token verifier, nil when authentication is off.
func (s *Server) Auth() *auth.Verifier { return s.auth }

// Reload re-reads what may change while the server runs: the TLS
// certificate and key, the auth key files and JWK Set (`fabric serve` calls
// it on SIGHUP). Open connections are not touched; on error what is in use
// stays.
func (s *Server) Reload() error {
	var errs []error
	if s.cert != nil {
		if err := s.cert.load(); err != nil {
			s.log.Error("TLS certificate not reloaded: the old one stays", "err", err)
			errs = append(errs, err)
		} else {
			s.log.Info("TLS certificate reloaded", "cert", s.cert.certFile)
		}
	}
	if s.auth != nil {
		if err := s.auth.Reload(); err != nil {
			s.log.Error("auth keys not reloaded", "err", err)
			errs = append(errs, err)
		} else {
			s.log.Info("auth keys reloaded", "algorithms", s.auth.Algorithms())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("server: reload: %w", err)
	}
	return nil
}

// presenceIdentity is the presence member key and data when auth is on
// (the user id and the token's info; anonymous connections get an opaque
// random key), nil otherwise: fabric.PresenceOptions.Key and Select.
func (s *Server) presenceIdentity() (key func(*fabric.Client) string, sel func(any) any) {
	if s.auth == nil {
		return nil, nil
	}
	return s.auth.PresenceKey, s.auth.PresenceSelect
}
