package jetstream

import (
	"encoding/base64"
	"errors"
	"strings"
)

// DefaultPrefix is the first subject token of every Fabric subject.
const DefaultPrefix = "fabric"

// SubjectToken encodes a valid topic as a single NATS subject token.
//
// The mapping is injective and never produces '.', '*', '>' or whitespace:
//   - a topic made only of [A-Za-z0-9_:-] is its own token ("chat:room-1");
//   - any other topic is "~" followed by the unpadded base64url encoding of
//     its UTF-8 bytes ("a.b" → "~YS5i").
//
// '~' is outside the plain alphabet, so the two forms never collide, and a
// topic can never match a subscription wildcard by accident.
func SubjectToken(topic string) string {
	if isPlainToken(topic) {
		return topic
	}
	return "~" + base64.RawURLEncoding.EncodeToString([]byte(topic))
}

// TopicFromToken inverts SubjectToken.
func TopicFromToken(token string) (string, error) {
	if rest, ok := strings.CutPrefix(token, "~"); ok {
		b, err := base64.RawURLEncoding.Strict().DecodeString(rest)
		if err != nil {
			return "", errors.New("jetstream: malformed subject token: " + err.Error())
		}
		if isPlainToken(string(b)) { // would have been encoded plainly
			return "", errors.New("jetstream: non-canonical subject token")
		}
		return string(b), nil
	}
	if token == "" || !isPlainToken(token) {
		return "", errors.New("jetstream: malformed subject token")
	}
	return token, nil
}

// Subject returns the NATS subject that carries live messages of topic:
// "<prefix>.t.<SubjectToken(topic)>".
func Subject(prefix, topic string) string {
	return prefix + ".t." + SubjectToken(topic)
}

func isPlainToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-' || c == ':') {
			return false
		}
	}
	return true
}
