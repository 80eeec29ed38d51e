package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"slices"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// Key is one verification key.
type Key struct {
	// ID is the key's kid: a token naming it in its header is verified
	// with this key only. Keys without ID verify tokens that name no kid or
	// a kid no key has.
	ID string
	// Algorithm, when set, is the only algorithm the key verifies (such as
	// "RS256"); otherwise every algorithm of its family does.
	Algorithm string
	// Key is the key material: a []byte HMAC secret (at least 32 bytes),
	// an *rsa.PublicKey (at least 2048 bits), an *ecdsa.PublicKey (P-256,
	// P-384 or P-521) or an ed25519.PublicKey.
	Key any
}

// Minimum key sizes: RFC 7518 asks for an HMAC key at least as long as
// the hash (256 bits for HS256) and RSA keys of 2048 bits or more.
const (
	MinSecretBytes = 32
	MinRSABits     = 2048
)

// entry is a key with the algorithms it may verify.
type entry struct {
	kid  string
	algs []string
	key  any
}

// keySet is an immutable snapshot of every key; Reload swaps it whole.
type keySet struct {
	byKid   map[string][]entry
	noKid   []entry
	all     []entry
	methods []string // every algorithm some key verifies
	parser  *jwt.Parser
}

func newKeySet(keys []Key) (*keySet, error) {
	ks := &keySet{byKid: map[string][]entry{}}
	for i, k := range keys {
		e, err := newEntry(k)
		if err != nil {
			name := k.ID
			if name == "" {
				name = fmt.Sprintf("#%d", i)
			}
			return nil, fmt.Errorf("key %s: %w", name, err)
		}
		ks.all = append(ks.all, e)
		if e.kid == "" {
			ks.noKid = append(ks.noKid, e)
		} else {
			ks.byKid[e.kid] = append(ks.byKid[e.kid], e)
		}
		for _, a := range e.algs {
			if !slices.Contains(ks.methods, a) {
				ks.methods = append(ks.methods, a)
			}
		}
	}
	if len(ks.all) == 0 {
		return nil, errors.New("no verification key")
	}
	return ks, nil
}

// candidates returns the keys that may verify a token of alg naming kid:
// the key with that kid, else (an unknown kid) the keys without kid, else
// (no kid at all) every key; each only if it verifies alg.
func (ks *keySet) candidates(alg, kid string) []jwt.VerificationKey {
	pool := ks.all
	if kid != "" {
		if es, ok := ks.byKid[kid]; ok {
			pool = es
		} else {
			pool = ks.noKid
		}
	}
	var out []jwt.VerificationKey
	for _, e := range pool {
		if slices.Contains(e.algs, alg) {
			out = append(out, e.key)
		}
	}
	return out
}

// newEntry checks k's material and works out the algorithms it verifies.
func newEntry(k Key) (entry, error) {
	var algs []string
	switch key := k.Key.(type) {
	case []byte:
		if len(key) < MinSecretBytes {
			return entry{}, fmt.Errorf("an HMAC secret must be at least %d bytes, got %d", MinSecretBytes, len(key))
		}
		algs = []string{"HS256"}
		if len(key) >= 48 {
			algs = append(algs, "HS384")
		}
		if len(key) >= 64 {
			algs = append(algs, "HS512")
		}
	case *rsa.PublicKey:
		if key == nil || key.N == nil || key.N.BitLen() < MinRSABits {
			return entry{}, fmt.Errorf("an RSA key must have at least %d bits", MinRSABits)
		}
		algs = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
	case *ecdsa.PublicKey:
		if key == nil || key.Curve == nil {
			return entry{}, errors.New("empty EC key")
		}
		switch key.Curve {
		case elliptic.P256():
			algs = []string{"ES256"}
		case elliptic.P384():
			algs = []string{"ES384"}
		case elliptic.P521():
			algs = []string{"ES512"}
		default:
			return entry{}, fmt.Errorf("EC curve %s: want P-256, P-384 or P-521", key.Curve.Params().Name)
		}
	case ed25519.PublicKey:
		if len(key) != ed25519.PublicKeySize {
			return entry{}, fmt.Errorf("an Ed25519 key has %d bytes, got %d", ed25519.PublicKeySize, len(key))
		}
		algs = []string{"EdDSA"}
	case nil:
		return entry{}, errors.New("no key material")
	default:
		return entry{}, fmt.Errorf("unsupported key type %T (give public keys: a private key does not belong on the server)", k.Key)
	}
	if k.Algorithm != "" {
		if !slices.Contains(algs, k.Algorithm) {
			return entry{}, fmt.Errorf("algorithm %q does not fit the key (it verifies %s)", k.Algorithm, strings.Join(algs, ", "))
		}
		algs = []string{k.Algorithm}
	}
	return entry{kid: k.ID, algs: algs, key: k.Key}, nil
}

// LoadKeyFile reads the verification keys of a file: PEM public keys
// ("PUBLIC KEY", "RSA PUBLIC KEY") or certificates, any number of them, or
// a JWK or JWK Set (JSON). A private key is refused: the server only needs
// the public half.
func LoadKeyFile(path string) ([]Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("auth: key file: %w", err)
	}
	var keys []Key
	if t := strings.TrimSpace(string(data)); strings.HasPrefix(t, "{") {
		keys, err = ParseJWKS(data)
	} else {
		keys, err = ParsePEM(data)
	}
	if err != nil {
		return nil, fmt.Errorf("auth: key file %s: %w", path, err)
	}
	return keys, nil
}

// ParsePEM returns the public keys of PEM data: PUBLIC KEY (PKIX),
// RSA PUBLIC KEY (PKCS #1) and CERTIFICATE blocks.
func ParsePEM(data []byte) ([]Key, error) {
	var keys []Key
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		var k any
		var err error
		switch b.Type {
		case "PUBLIC KEY":
			k, err = x509.ParsePKIXPublicKey(b.Bytes)
		case "RSA PUBLIC KEY":
			k, err = x509.ParsePKCS1PublicKey(b.Bytes)
		case "CERTIFICATE":
			var cert *x509.Certificate
			if cert, err = x509.ParseCertificate(b.Bytes); err == nil {
				k = cert.PublicKey
			}
		default:
			if strings.Contains(b.Type, "PRIVATE") {
				return nil, fmt.Errorf("PEM block %q is a private key: give the server the public key", b.Type)
			}
			return nil, fmt.Errorf("PEM block %q: want PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE", b.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("PEM block %q: %w", b.Type, err)
		}
		keys = append(keys, Key{Key: k})
	}
	if len(keys) == 0 {
		return nil, errors.New("no PEM public key")
	}
	return keys, nil
}

// jwk is one JSON Web Key (RFC 7517), the members this package reads.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	N   string `json:"n"`
	E   string `json:"e"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Y   string `json:"y"`
	K   string `json:"k"`
	D   string `json:"d"`
}

// ParseJWKS returns the verification keys of a JWK Set ({"keys":[...]})
// or of a single JWK: RSA, EC (P-256, P-384, P-521), OKP (Ed25519) and
// oct (HMAC secrets). Keys for encryption ("use":"enc") and key types it
// does not know are skipped; a key with private members is refused.
func ParseJWKS(data []byte) ([]Key, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
		Kty  string            `json:"kty"`
	}
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("JWKS: %w", err)
	}
	raw := set.Keys
	if raw == nil && set.Kty != "" {
		raw = []json.RawMessage{data}
	}
	var keys []Key
	for i, r := range raw {
		var j jwk
		if err := json.Unmarshal(r, &j); err != nil {
			return nil, fmt.Errorf("JWKS key %d: %w", i, err)
		}
		if j.Use == "enc" {
			continue
		}
		k, ok, err := j.key()
		if err != nil {
			name := j.Kid
			if name == "" {
				name = fmt.Sprintf("#%d", i)
			}
			return nil, fmt.Errorf("JWKS key %s: %w", name, err)
		}
		if ok {
			keys = append(keys, Key{ID: j.Kid, Algorithm: j.Alg, Key: k})
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("JWKS: no usable verification key")
	}
	return keys, nil
}

// key decodes the key material; ok is false for a key type it skips.
func (j *jwk) key() (k any, ok bool, err error) {
	if j.D != "" && j.Kty != "oct" {
		return nil, false, errors.New("a private key: publish only the public members")
	}
	switch j.Kty {
	case "RSA":
		n, err := b64(j.N, "n")
		if err != nil {
			return nil, false, err
		}
		e, err := b64(j.E, "e")
		if err != nil {
			return nil, false, err
		}
		ev := new(big.Int).SetBytes(e)
		if !ev.IsInt64() || ev.Int64() < 3 || ev.Int64() > 1<<31-1 {
			return nil, false, errors.New("RSA exponent out of range")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(ev.Int64())}, true, nil
	case "EC":
		var c elliptic.Curve
		switch j.Crv {
		case "P-256":
			c = elliptic.P256()
		case "P-384":
			c = elliptic.P384()
		case "P-521":
			c = elliptic.P521()
		default:
			return nil, false, fmt.Errorf("EC curve %q: want P-256, P-384 or P-521", j.Crv)
		}
		x, err := b64(j.X, "x")
		if err != nil {
			return nil, false, err
		}
		y, err := b64(j.Y, "y")
		if err != nil {
			return nil, false, err
		}
		size := (c.Params().BitSize + 7) / 8
		if len(x) != size || len(y) != size {
			return nil, false, fmt.Errorf("EC coordinates must be %d bytes", size)
		}
		point := append(append([]byte{4}, x...), y...)
		pk, err := ecdsa.ParseUncompressedPublicKey(c, point)
		if err != nil {
			return nil, false, fmt.Errorf("EC key: %w", err)
		}
		return pk, true, nil
	case "OKP":
		if j.Crv != "Ed25519" {
			return nil, false, fmt.Errorf("OKP curve %q: want Ed25519", j.Crv)
		}
		x, err := b64(j.X, "x")
		if err != nil {
			return nil, false, err
		}
		return ed25519.PublicKey(x), true, nil
	case "oct":
		secret, err := b64(j.K, "k")
		if err != nil {
			return nil, false, err
		}
		return secret, true, nil
	}
	return nil, false, nil
}

func b64(s, member string) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("member %q missing", member)
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return nil, fmt.Errorf("member %q: %w", member, err)
	}
	return b, nil
}
