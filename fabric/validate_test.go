package fabric

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

var topicSeeds = []string{
	"chat", "chat:room-1", "a.b", "a.b.c", "*", ">", "a.*", "a.>", "a b", " ", "~", "~YS5i", "YS5i",
	"room:ünïcødé", "日本語", "emoji 🎉", "$SYS", "__rpc", "__replay:chat", "a:b:c", "-", "_", ":",
	strings.Repeat("x", 256), strings.Repeat("é", 256), strings.Repeat("🎉", 128),
	"tab\there", "quo\"te", `back\slash`, "nul\x00", "\xff\xfe", "del\x7f", "c1\u0085",
}

// FuzzValidateTopic: validation never panics, and whatever it accepts can be
// written into the envelope without escaping.
func FuzzValidateTopic(f *testing.F) {
	for _, s := range topicSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidateTopic(s) != nil {
			return
		}
		if !utf8.ValidString(s) || strings.ContainsAny(s, "\"\\") {
			t.Fatalf("accepted %q", s)
		}
		for _, r := range s {
			if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
				t.Fatalf("accepted control character in %q", s)
			}
		}
		env := Envelope(s, s, []byte(`{"k":1}`))
		topic, event, data, ok := SplitEnvelope(env)
		if !ok || string(topic) != s || string(event) != s || string(data) != `{"k":1}` {
			t.Fatalf("envelope of %q does not split back: %s", s, env)
		}
	})
}

func TestValidateLengthInUTF16Units(t *testing.T) {
	if err := ValidateTopic(strings.Repeat("🎉", 128)); err != nil { // 256 UTF-16 units
		t.Errorf("128 emoji rejected: %v", err)
	}
	if err := ValidateTopic(strings.Repeat("🎉", 129)); err == nil {
		t.Error("129 emoji (258 UTF-16 units) accepted")
	}
	if err := ValidateTopic(strings.Repeat("é", 256)); err != nil {
		t.Errorf("256 é rejected: %v", err)
	}
}

func TestWithSeq(t *testing.T) {
	env := Envelope("t", "e", []byte(`[1,2]`))
	if got := string(WithSeq(env, 42)); got != `{"topic":"t","event":"e","data":[1,2],"seq":42}` {
		t.Errorf("WithSeq = %s", got)
	}
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
