package auth_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/golang-jwt/jwt/v5"
)

// secret is an HMAC secret long enough for HS256.
const secret = "0123456789abcdef0123456789abcdef"

// RSA keys are slow to make: each test binary makes two, once.
var rsaKeys = sync.OnceValue(func() [2]*rsa.PrivateKey {
	var ks [2]*rsa.PrivateKey
	for i := range ks {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		ks[i] = k
	}
	return ks
})

func rsaKey() *rsa.PrivateKey      { return rsaKeys()[0] }
func otherRSAKey() *rsa.PrivateKey { return rsaKeys()[1] }

func ecKey(t testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// claims are a token's claims for sub, valid for ttl.
func claims(sub string, ttl time.Duration, fabric map[string]any) jwt.MapClaims {
	now := time.Now()
	c := jwt.MapClaims{"sub": sub, "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	if fabric != nil {
		c["fabric"] = fabric
	}
	return c
}

// sign signs c with method and key, naming kid when not empty.
func sign(t testing.TB, method jwt.SigningMethod, key any, kid string, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, c)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// hs signs c with the test secret.
func hs(t testing.TB, c jwt.MapClaims) string {
	return sign(t, jwt.SigningMethodHS256, []byte(secret), "", c)
}

func newVerifier(t testing.TB, o auth.Options) *auth.Verifier {
	t.Helper()
	v, err := auth.NewVerifier(o)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// reasonOf returns the refusal's reason, failing the test when err is no
// *auth.TokenError.
func reasonOf(t testing.TB, err error) string {
	t.Helper()
	var te *auth.TokenError
	if !errors.As(err, &te) {
		t.Fatalf("error %v (%T) is no *auth.TokenError", err, err)
	}
	return te.Reason
}

// pemFile writes the PEM public key of pub to a file and returns its path.
func pemFile(t testing.TB, pub crypto.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// jwk returns the public JWK of key under kid.
func jwk(t testing.TB, kid string, key any) map[string]any {
	t.Helper()
	switch k := key.(type) {
	case *rsa.PublicKey:
		return map[string]any{"kty": "RSA", "kid": kid, "use": "sig", "n": b64(k.N.Bytes()), "e": b64(big.NewInt(int64(k.E)).Bytes())}
	case *ecdsa.PublicKey:
		raw, err := k.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		size := (k.Curve.Params().BitSize + 7) / 8
		return map[string]any{"kty": "EC", "kid": kid, "crv": k.Curve.Params().Name, "x": b64(raw[1 : 1+size]), "y": b64(raw[1+size:])}
	case ed25519.PublicKey:
		return map[string]any{"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(k)}
	case []byte:
		return map[string]any{"kty": "oct", "kid": kid, "k": b64(k)}
	}
	t.Fatalf("no JWK for %T", key)
	return nil
}

// writeJWKS writes a JWK Set of keys to path.
func writeJWKS(t testing.TB, path string, keys ...map[string]any) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// httptestRequest is a connection request carrying token as a Bearer
// token (none when empty).
func httptestRequest(token string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/ws", nil)
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	return r
}
