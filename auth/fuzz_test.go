package auth_test

import (
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/golang-jwt/jwt/v5"
)

// FuzzVerify: Verify never panics, never accepts a token it holds no key
// for (the seeds are tokens signed with other keys, with alg none, or
// broken ones, and nothing the fuzzer makes of them can carry a valid
// signature), and refuses with one of its short reasons.
func FuzzVerify(f *testing.F) {
	v := newVerifier(f, auth.Options{Secrets: []string{secret}, Keys: []auth.Key{{ID: "k1", Key: &rsaKey().PublicKey}}})
	other := []byte(strings.Repeat("o", 32))
	c := claims("ada", time.Hour, map[string]any{"subscribe": []string{"*"}, "info": map[string]any{"name": "Ada"}})
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, c).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{
		sign(f, jwt.SigningMethodHS256, other, "", c),
		sign(f, jwt.SigningMethodHS256, other, "k1", c),
		sign(f, jwt.SigningMethodRS256, otherRSAKey(), "k1", c),
		sign(f, jwt.SigningMethodRS256, otherRSAKey(), "", c),
		sign(f, jwt.SigningMethodPS256, otherRSAKey(), "k2", c),
		none,
		"",
		".",
		"..",
		"a.b.c",
		"eyJhbGciOiJIUzI1NiJ9.e30.",
		"eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZGEifQ.",
		"eyJhbGciOiJIUzI1NiIsImtpZCI6eyJ4IjoxfX0.eyJzdWIiOjF9.AAAA",
		"eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.bnVsbA.c2ln",
		strings.Repeat("eyJ", 100),
	} {
		f.Add(s)
	}
	reasons := map[string]bool{}
	for _, r := range []string{auth.ReasonMissing, auth.ReasonTooLarge, auth.ReasonMalformed, auth.ReasonAlgorithm,
		auth.ReasonUnknownKey, auth.ReasonSignature, auth.ReasonExpired, auth.ReasonNotYetValid, auth.ReasonIssuedFuture,
		auth.ReasonNoExp, auth.ReasonIssuer, auth.ReasonAudience, auth.ReasonNoSubject, auth.ReasonClaim, auth.ReasonInvalidClaims} {
		reasons[r] = true
	}
	f.Fuzz(func(t *testing.T, token string) {
		u, err := v.Verify(token)
		if err == nil {
			t.Fatalf("verified without the key: %q as %q", token, u.UserID())
		}
		if r := reasonOf(t, err); !reasons[r] {
			t.Fatalf("unknown reason %q", r)
		}
	})
}
