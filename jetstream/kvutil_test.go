package jetstream

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

var kvKeyRe = regexp.MustCompile(`^[-/_=a-zA-Z0-9]+$`)

func FuzzKVToken(f *testing.F) {
	for _, s := range []string{"room:1", "a.b", "plain_Token-1", "", "ünïcödé", "*", ">", "a b", strings.Repeat("x", 200), "=abc", "==x"} {
		f.Add(s, "other")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		ta, tb := kvToken(a), kvToken(b)
		if !kvKeyRe.MatchString(ta) {
			t.Fatalf("kvToken(%q) = %q: not a valid KV key token", a, ta)
		}
		if a != b && ta == tb {
			t.Fatalf("kvToken(%q) == kvToken(%q) == %q", a, b, ta)
		}
	})
}

func TestTTLSeconds(t *testing.T) {
	for in, want := range map[time.Duration]time.Duration{
		0: time.Second, 200 * time.Millisecond: time.Second, time.Second: time.Second,
		1500 * time.Millisecond: 2 * time.Second, 30 * time.Second: 30 * time.Second,
	} {
		if got := ttlSeconds(in); got != want {
			t.Errorf("ttlSeconds(%s) = %s, want %s", in, got, want)
		}
	}
}
