package auth_test

import (
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/fabric"
	"github.com/golang-jwt/jwt/v5"
)

// TestVerifyAccepted: a valid token's user has its subject, expiry, info
// and permissions, ${sub} expanded to the subject literally.
func TestVerifyAccepted(t *testing.T) {
	v := newVerifier(t, auth.Options{Secrets: []string{secret}})
	tok := hs(t, claims("ada", time.Hour, map[string]any{
		"subscribe": []string{"chat:*", "user:${sub}"},
		"publish":   []string{"chat:*"},
		"rpc":       []string{"chat/*"},
		"info":      map[string]any{"name": "Ada"},
	}))
	u, err := v.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if u.UserID() != "ada" || u.Anonymous() {
		t.Fatalf("user %q anonymous=%v", u.UserID(), u.Anonymous())
	}
	if k, ok := fabric.UserKey(u); !ok || k != "ada" {
		t.Fatalf("fabric.UserKey = %q, %v", k, ok)
	}
	var _ fabric.Expirer = u
	if d := time.Until(u.ExpiresAt()); d < 59*time.Minute || d > time.Hour {
		t.Fatalf("expires in %s", d)
	}
	if string(u.Info()) != `{"name":"Ada"}` {
		t.Fatalf("info %s", u.Info())
	}
	for topic, want := range map[string]bool{"chat:1": true, "chat:": true, "user:ada": true, "user:bob": false, "user:ada:x": false, "news:1": false} {
		if got := u.CanSubscribe(topic); got != want {
			t.Errorf("CanSubscribe(%q) = %v", topic, got)
		}
	}
	if !u.CanPublish("chat:x") || u.CanPublish("user:ada") || !u.CanCall("chat/send") || u.CanCall("admin/kick") {
		t.Fatal("publish or rpc permissions wrong")
	}
	// A subject holding '*' is no wildcard.
	u, err = v.Verify(hs(t, claims("a*", time.Hour, map[string]any{"subscribe": []string{"user:${sub}"}})))
	if err != nil {
		t.Fatal(err)
	}
	if u.CanSubscribe("user:ada") || !u.CanSubscribe("user:a*") {
		t.Fatal("a '*' in the subject acted as a wildcard")
	}
}

// TestVerifyRefused: expired, not yet valid, wrong key, wrong algorithm
// (none; HS signed with the RSA public key as its secret), missing claims,
// wrong iss or aud, malformed: each refused with its reason.
func TestVerifyRefused(t *testing.T) {
	pubPEM := pemFile(t, &rsaKey().PublicKey)
	rsaV := newVerifier(t, auth.Options{KeyFiles: []string{pubPEM}})
	hsV := newVerifier(t, auth.Options{Secrets: []string{secret}, Issuer: "https://id.example", Audience: []string{"fabric"}})
	good := func() jwt.MapClaims {
		c := claims("ada", time.Hour, nil)
		c["iss"], c["aud"] = "https://id.example", "fabric"
		return c
	}
	with := func(f func(c jwt.MapClaims)) jwt.MapClaims { c := good(); f(c); return c }
	pemBytes, err := os.ReadFile(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	noneTok, err := jwt.NewWithClaims(jwt.SigningMethodNone, good()).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hsV.Verify(hs(t, good())); err != nil {
		t.Fatalf("the good token: %v", err)
	}
	if _, err := rsaV.Verify(sign(t, jwt.SigningMethodRS256, rsaKey(), "", good())); err != nil {
		t.Fatalf("the good RSA token: %v", err)
	}
	cases := []struct {
		name   string
		v      *auth.Verifier
		token  string
		reason string
	}{
		{"missing", hsV, "", auth.ReasonMissing},
		{"expired", hsV, hs(t, with(func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-time.Minute).Unix() })), auth.ReasonExpired},
		{"not yet valid", hsV, hs(t, with(func(c jwt.MapClaims) { c["nbf"] = time.Now().Add(time.Minute).Unix() })), auth.ReasonNotYetValid},
		{"issued in the future", hsV, hs(t, with(func(c jwt.MapClaims) { c["iat"] = time.Now().Add(time.Minute).Unix() })), auth.ReasonIssuedFuture},
		{"no exp", hsV, hs(t, with(func(c jwt.MapClaims) { delete(c, "exp") })), auth.ReasonNoExp},
		{"no sub", hsV, hs(t, with(func(c jwt.MapClaims) { delete(c, "sub") })), auth.ReasonNoSubject},
		{"wrong issuer", hsV, hs(t, with(func(c jwt.MapClaims) { c["iss"] = "https://evil.example" })), auth.ReasonIssuer},
		{"no issuer", hsV, hs(t, with(func(c jwt.MapClaims) { delete(c, "iss") })), auth.ReasonIssuer},
		{"wrong audience", hsV, hs(t, with(func(c jwt.MapClaims) { c["aud"] = []string{"other"} })), auth.ReasonAudience},
		{"bad claim", hsV, hs(t, with(func(c jwt.MapClaims) { c["fabric"] = map[string]any{"subscribe": "chat:*"} })), auth.ReasonClaim},
		{"wrong secret", hsV, sign(t, jwt.SigningMethodHS256, []byte(strings.Repeat("x", 32)), "", good()), auth.ReasonSignature},
		{"wrong RSA key", rsaV, sign(t, jwt.SigningMethodRS256, otherRSAKey(), "", good()), auth.ReasonSignature},
		{"alg none", hsV, noneTok, auth.ReasonAlgorithm},
		{"alg none on RSA", rsaV, noneTok, auth.ReasonAlgorithm},
		{"HS signed with the RSA public key", rsaV, sign(t, jwt.SigningMethodHS256, pemBytes, "", good()), auth.ReasonAlgorithm},
		{"HS512 with a 32-byte secret", hsV, sign(t, jwt.SigningMethodHS512, []byte(secret), "", good()), auth.ReasonAlgorithm},
		{"RS token to an HMAC verifier", hsV, sign(t, jwt.SigningMethodRS256, rsaKey(), "", good()), auth.ReasonAlgorithm},
		{"malformed", hsV, "not.a.jwt", auth.ReasonMalformed},
		{"two segments", hsV, "abc.def", auth.ReasonMalformed},
		{"too large", hsV, strings.Repeat("a", auth.MaxTokenBytes+1), auth.ReasonTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			u, err := c.v.Verify(c.token)
			if err == nil {
				t.Fatalf("accepted as %q", u.UserID())
			}
			if r := reasonOf(t, err); r != c.reason {
				t.Fatalf("reason %q (%v), want %q", r, err, c.reason)
			}
			if c.token != "" && strings.Contains(err.Error(), c.token) {
				t.Fatal("the error holds the token")
			}
		})
	}
}

// TestLeewayAndOptionalExp: a token expired within the leeway passes, one
// past it does not; ExpOptional takes tokens without exp.
func TestLeewayAndOptionalExp(t *testing.T) {
	v := newVerifier(t, auth.Options{Secrets: []string{secret}})
	c := claims("ada", 0, nil)
	c["exp"] = time.Now().Add(-2 * time.Second).Unix()
	if _, err := v.Verify(hs(t, c)); err != nil {
		t.Fatalf("within the 5s leeway: %v", err)
	}
	c["exp"] = time.Now().Add(-10 * time.Second).Unix()
	if _, err := v.Verify(hs(t, c)); err == nil {
		t.Fatal("accepted 10s after exp")
	}
	strict := newVerifier(t, auth.Options{Secrets: []string{secret}, Leeway: -1})
	c["exp"] = time.Now().Add(-2 * time.Second).Unix()
	if _, err := strict.Verify(hs(t, c)); err == nil {
		t.Fatal("accepted after exp without leeway")
	}
	opt := newVerifier(t, auth.Options{Secrets: []string{secret}, ExpOptional: true})
	delete(c, "exp")
	u, err := opt.Verify(hs(t, c))
	if err != nil {
		t.Fatal(err)
	}
	if !u.ExpiresAt().IsZero() {
		t.Fatalf("a token without exp expires at %s", u.ExpiresAt())
	}
}

// TestKeyTypes: RSA (RS, PS), EC (P-256, P-384) and Ed25519 keys from PEM
// files and from a JWK Set, HMAC secrets from a JWK Set.
func TestKeyTypes(t *testing.T) {
	ec256, ec384 := ecKey(t, elliptic.P256()), ecKey(t, elliptic.P384())
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	oct := []byte(strings.Repeat("k", 64))
	c := claims("ada", time.Hour, nil)
	type signer struct {
		method jwt.SigningMethod
		key    any
	}
	signers := map[string]signer{
		"RS256": {jwt.SigningMethodRS256, rsaKey()},
		"PS384": {jwt.SigningMethodPS384, rsaKey()},
		"ES256": {jwt.SigningMethodES256, ec256},
		"ES384": {jwt.SigningMethodES384, ec384},
		"EdDSA": {jwt.SigningMethodEdDSA, edPriv},
	}
	pems := []string{pemFile(t, &rsaKey().PublicKey), pemFile(t, &ec256.PublicKey), pemFile(t, &ec384.PublicKey), pemFile(t, edPub)}
	byPEM := newVerifier(t, auth.Options{KeyFiles: pems})
	jwksPath := filepath.Join(t.TempDir(), "jwks.json")
	writeJWKS(t, jwksPath, jwk(t, "r", &rsaKey().PublicKey), jwk(t, "e1", &ec256.PublicKey), jwk(t, "e3", &ec384.PublicKey), jwk(t, "ed", edPub), jwk(t, "h", oct))
	byJWKS := newVerifier(t, auth.Options{JWKSFile: jwksPath})
	kids := map[string]string{"RS256": "r", "PS384": "r", "ES256": "e1", "ES384": "e3", "EdDSA": "ed"}
	for name, s := range signers {
		if _, err := byPEM.Verify(sign(t, s.method, s.key, "", c)); err != nil {
			t.Errorf("%s from PEM: %v", name, err)
		}
		if _, err := byJWKS.Verify(sign(t, s.method, s.key, kids[name], c)); err != nil {
			t.Errorf("%s from JWKS: %v", name, err)
		}
		// A token naming another key's kid is checked with that key only.
		if _, err := byJWKS.Verify(sign(t, s.method, s.key, "h", c)); err == nil {
			t.Errorf("%s naming the HMAC kid verified", name)
		}
	}
	for _, m := range []jwt.SigningMethod{jwt.SigningMethodHS256, jwt.SigningMethodHS512} {
		if _, err := byJWKS.Verify(sign(t, m, oct, "h", c)); err != nil {
			t.Errorf("%s from JWKS: %v", m.Alg(), err)
		}
	}
	// A JWK Set with kids verifies a token without kid with any key of its
	// algorithm.
	if _, err := byJWKS.Verify(sign(t, jwt.SigningMethodES256, ec256, "", c)); err != nil {
		t.Errorf("ES256 without kid: %v", err)
	}
}

// TestKeyRefused: weak, private or unknown key material is refused when
// the verifier is built.
func TestKeyRefused(t *testing.T) {
	if _, err := auth.NewVerifier(auth.Options{}); err == nil {
		t.Error("a verifier without keys")
	}
	if _, err := auth.NewVerifier(auth.Options{Secrets: []string{"short"}}); err == nil || !strings.Contains(err.Error(), "32 bytes") {
		t.Errorf("a short secret: %v", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(ecKey(t, elliptic.P256()))
	if err != nil {
		t.Fatal(err)
	}
	priv := filepath.Join(t.TempDir(), "priv.pem")
	if err := os.WriteFile(priv, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := auth.NewVerifier(auth.Options{KeyFiles: []string{priv}}); err == nil || !strings.Contains(err.Error(), "private key") {
		t.Errorf("a private key file: %v", err)
	}
	if _, err := auth.NewVerifier(auth.Options{KeyFiles: []string{filepath.Join(t.TempDir(), "missing.pem")}}); err == nil {
		t.Error("a missing key file")
	}
	if _, err := auth.ParseJWKS([]byte(`{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB","d":"AQAB"}]}`)); err == nil {
		t.Error("a private JWK")
	}
	if _, err := auth.NewVerifier(auth.Options{Keys: []auth.Key{{Key: &ecKey(t, elliptic.P256()).PublicKey, Algorithm: "RS256"}}}); err == nil {
		t.Error("an EC key restricted to RS256")
	}
}

// TestJWKSRotation: keys are picked by kid; a reload adds a new kid while
// the old one keeps working, until a reload without it; a token whose kid
// is unknown is tried against the keys without kid of its algorithm only;
// a broken file leaves the keys in use.
func TestJWKSRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "jwks.json")
	k1, k2 := rsaKey(), otherRSAKey()
	writeJWKS(t, path, jwk(t, "k1", &k1.PublicKey))
	v := newVerifier(t, auth.Options{JWKSFile: path, Secrets: []string{secret}})
	c := claims("ada", time.Hour, nil)
	t1, t2 := sign(t, jwt.SigningMethodRS256, k1, "k1", c), sign(t, jwt.SigningMethodRS256, k2, "k2", c)
	if _, err := v.Verify(t1); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(t2); err == nil || reasonOf(t, err) != auth.ReasonUnknownKey {
		t.Fatalf("k2 before it is published: %v", err)
	}
	// Unknown kid: only keys without kid, of the token's family.
	if _, err := v.Verify(sign(t, jwt.SigningMethodHS256, []byte(secret), "zzz", c)); err != nil {
		t.Fatalf("HS256 with an unknown kid, against the kid-less secret: %v", err)
	}
	if _, err := v.Verify(sign(t, jwt.SigningMethodRS256, k1, "zzz", c)); err == nil {
		t.Fatal("RS256 with an unknown kid verified with k1")
	}

	writeJWKS(t, path, jwk(t, "k1", &k1.PublicKey), jwk(t, "k2", &k2.PublicKey))
	if err := v.Reload(); err != nil {
		t.Fatal(err)
	}
	for name, tok := range map[string]string{"k1": t1, "k2": t2} {
		if _, err := v.Verify(tok); err != nil {
			t.Fatalf("%s after adding k2: %v", name, err)
		}
	}
	// k2 signed as k1 does not pass: the kid picks the key.
	if _, err := v.Verify(sign(t, jwt.SigningMethodRS256, k2, "k1", c)); err == nil {
		t.Fatal("a k2 signature under kid k1 verified")
	}

	if err := os.WriteFile(path, []byte("{broken"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := v.Reload(); err == nil {
		t.Fatal("a broken JWKS reloaded")
	}
	if _, err := v.Verify(t2); err != nil {
		t.Fatalf("k2 after a failed reload: %v", err)
	}

	writeJWKS(t, path, jwk(t, "k2", &k2.PublicKey))
	if err := v.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(t1); err == nil {
		t.Fatal("k1 after its removal")
	}
	if _, err := v.Verify(t2); err != nil {
		t.Fatal(err)
	}
}

// TestMatchPattern: '*' is any run of characters, ${sub} the user id
// literally, and a ${sub} pattern matches nothing without a user.
func TestMatchPattern(t *testing.T) {
	cases := []struct {
		pattern, sub, s string
		want            bool
	}{
		{"chat:*", "", "chat:1", true},
		{"chat:*", "", "chat:", true},
		{"chat:*", "", "chat", false},
		{"*", "", "", true},
		{"a*b*c", "", "abc", true},
		{"a*b*c", "", "axxbyyc", true},
		{"a*b*c", "", "acb", false},
		{"a*a", "", "a", false},
		{"*:x", "", "a:x:x", true},
		{"user:${sub}", "ada", "user:ada", true},
		{"user:${sub}", "ada", "user:adam", false},
		{"user:${sub}", "", "user:", false},
		{"dm:${sub}:*", "ada", "dm:ada:bob", true},
		{"dm:${sub}:*", "ada", "dm:bob:ada", false},
		{"dm:${sub}:*", "a*", "dm:ab:x", false},
		{"dm:${sub}:*", "a*", "dm:a*:x", true},
		{"${sub}/${sub}", "x", "x/x", true},
		{"${sub}/${sub}", "x", "x/y", false},
	}
	for _, c := range cases {
		if got := auth.MatchPattern(c.pattern, c.sub, c.s); got != c.want {
			t.Errorf("MatchPattern(%q, %q, %q) = %v", c.pattern, c.sub, c.s, got)
		}
		if !strings.Contains(c.pattern, "${sub}") {
			if got := fabric.MatchTopics([]string{c.pattern})(c.s); got != c.want {
				t.Errorf("fabric.MatchTopics disagrees on %q, %q", c.pattern, c.s)
			}
		}
	}
}

// TestAnonymous: with AllowAnonymous, a request without a token is an
// anonymous user with the anonymous permissions and a random presence
// key; without it, 401.
func TestAnonymous(t *testing.T) {
	v := newVerifier(t, auth.Options{Secrets: []string{secret}, AllowAnonymous: true,
		Anonymous: auth.Permissions{Subscribe: []string{"news:*", "user:${sub}"}}})
	ud, err := v.Connect(httptestRequest(""))
	if err != nil {
		t.Fatal(err)
	}
	u := auth.UserOf(ud)
	if u == nil || !u.Anonymous() || u.UserID() != "" {
		t.Fatalf("anonymous user data %#v", ud)
	}
	if _, ok := fabric.UserKey(ud); ok {
		t.Fatal("fabric.UserKey sees a user in an anonymous connection")
	}
	if !u.CanSubscribe("news:1") || u.CanSubscribe("user:") || u.CanSubscribe("chat:1") {
		t.Fatal("anonymous permissions wrong")
	}
	ud2, _ := v.Connect(httptestRequest(""))
	k1, k2 := u.PresenceKey(), auth.UserOf(ud2).PresenceKey()
	if !strings.HasPrefix(k1, "anon:") || len(k1) < 20 || k1 == k2 {
		t.Fatalf("anonymous presence keys %q, %q", k1, k2)
	}
	strict := newVerifier(t, auth.Options{Secrets: []string{secret}})
	_, err = strict.Connect(httptestRequest(""))
	if se, ok := err.(*fabric.StatusError); !ok || se.Status != 401 {
		t.Fatalf("no token: %v", err)
	}
	// A bad token is refused even when anonymous access is allowed.
	_, err = v.Connect(httptestRequest("garbage"))
	if se, ok := err.(*fabric.StatusError); !ok || se.Status != 401 || se.Message != "invalid token: "+auth.ReasonMalformed {
		t.Fatalf("bad token: %v", err)
	}
}

// TestTokenFrom: the Authorization header wins over the query, which wins
// over the cookie.
func TestTokenFrom(t *testing.T) {
	r := httptest.NewRequest(http.MethodGet, "/ws?token=q", nil)
	r.AddCookie(&http.Cookie{Name: "fabric_token", Value: "c"})
	if got := auth.TokenFrom(r, "fabric_token"); got != "q" {
		t.Fatalf("query and cookie: %q", got)
	}
	r.Header.Set("Authorization", "bearer h")
	if got := auth.TokenFrom(r, "fabric_token"); got != "h" {
		t.Fatalf("header, query and cookie: %q", got)
	}
	r = httptest.NewRequest(http.MethodGet, "/ws", nil)
	r.AddCookie(&http.Cookie{Name: "sess", Value: "c"})
	if got := auth.TokenFrom(r, "sess"); got != "c" {
		t.Fatalf("cookie: %q", got)
	}
	r.Header.Set("Authorization", "Basic xyz")
	if got := auth.TokenFrom(r, "other"); got != "" {
		t.Fatalf("basic auth and another cookie: %q", got)
	}
}
