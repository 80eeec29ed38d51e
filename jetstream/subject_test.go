package jetstream

import (
	"strings"
	"testing"

	"github.com/fabricrt/fabric/fabric"
)

var topicSeeds = []string{
	"chat", "chat:room-1", "a.b", "a.b.c", "*", ">", "a.*", "a.>", "a b", " ", "~", "~YS5i", "YS5i",
	"room:ünïcødé", "日本語", "emoji 🎉", "$SYS", "__rpc", "__replay:chat", "a:b:c", "-", "_", ":",
	strings.Repeat("x", 256), strings.Repeat("é", 256), strings.Repeat("🎉", 128),
	"tab\there", "quo\"te", `back\slash`, "nul\x00", "\xff\xfe", "del\x7f", "c1\u0085",
}

// checkToken asserts the subject mapping properties for one valid topic.
func checkToken(t *testing.T, topic string) {
	tok := SubjectToken(topic)
	if tok == "" {
		t.Fatalf("empty token for %q", topic)
	}
	if strings.ContainsAny(tok, ".*> \t\r\n") {
		t.Fatalf("token %q for %q contains a subject separator or wildcard", tok, topic)
	}
	for _, r := range tok {
		if r < 0x21 || r > 0x7e {
			t.Fatalf("token %q for %q is not printable ASCII", tok, topic)
		}
	}
	back, err := TopicFromToken(tok)
	if err != nil || back != topic {
		t.Fatalf("TopicFromToken(%q) = %q, %v; want %q", tok, back, err, topic)
	}
	if s := Subject("fabric", topic); len(s) > 2048 {
		t.Fatalf("subject for %q is %d bytes", topic, len(s))
	}
}

func TestSubjectTokenSeeds(t *testing.T) {
	seen := map[string]string{}
	for _, topic := range topicSeeds {
		if fabric.ValidateTopic(topic) != nil {
			continue
		}
		checkToken(t, topic)
		tok := SubjectToken(topic)
		if prev, dup := seen[tok]; dup {
			t.Fatalf("topics %q and %q share token %q", prev, topic, tok)
		}
		seen[tok] = topic
	}
	if SubjectToken("chat:room-1") != "chat:room-1" {
		t.Error("plain topics should map to themselves")
	}
	if SubjectToken("a.b") == SubjectToken("a_b") {
		t.Error("a.b and a_b collide")
	}
}

// FuzzSubjectToken: for every valid topic the token is a single, wildcard-free
// subject token that decodes back to the topic (so two topics never share a
// subject), and nothing panics for any input.
func FuzzSubjectToken(f *testing.F) {
	for _, s := range topicSeeds {
		f.Add(s, "other")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		_, _ = TopicFromToken(a) // never panics on garbage
		if fabric.ValidateTopic(a) != nil {
			return
		}
		checkToken(t, a)
		if fabric.ValidateTopic(b) == nil && a != b && SubjectToken(a) == SubjectToken(b) {
			t.Fatalf("topics %q and %q share a subject", a, b)
		}
	})
}
