package jetstream

import (
	"encoding/json"
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

func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "alice", `quo"te`, `back\slash`, "ctl\x00\x1f", "ünïcödé ✓", "bad\xff\xfeutf8", "<&>", "\u2028"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := appendJSONString(nil, s)
		var back, want string
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatalf("appendJSONString(%q) = %s: not JSON: %v", s, got, err)
		}
		ref, _ := json.Marshal(s)
		_ = json.Unmarshal(ref, &want)
		if back != want {
			t.Fatalf("appendJSONString(%q) decodes to %q, encoding/json's to %q", s, back, want)
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
