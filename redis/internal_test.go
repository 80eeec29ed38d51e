package redis

import (
	"testing"
)

func TestParseFrame(t *testing.T) {
	for _, tc := range []struct {
		in        string
		env       string
		seq, prev uint64
		ok        bool
	}{
		{"\x00{}", "{}", 0, 0, true},
		{"\x00", "", 0, 0, true},
		{"\x0112:11:{\"a\":1}", `{"a":1}`, 12, 11, true},
		{"\x011:0:", "", 1, 0, true},
		{"\x010:0:{}", "", 0, 0, false}, // a stored message has a seq
		{"\x01:1:{}", "", 0, 0, false},
		{"\x011x:0:{}", "", 0, 0, false},
		{"\x0112{}", "", 0, 0, false},
		{"{}", "", 0, 0, false},
		{"", "", 0, 0, false},
	} {
		env, seq, prev, ok := parseFrame(tc.in)
		if ok != tc.ok || ok && (string(env) != tc.env || seq != tc.seq || prev != tc.prev) {
			t.Errorf("parseFrame(%q) = %q %d %d %v; want %q %d %d %v", tc.in, env, seq, prev, ok, tc.env, tc.seq, tc.prev, tc.ok)
		}
	}
}

func TestParseChange(t *testing.T) {
	op, inc, v, body, ok := parseChange(`Pabc:42:{"t":"x"}`)
	if !ok || op != 'P' || inc != "abc" || v != 42 || body != `{"t":"x"}` {
		t.Fatalf("put: %c %q %d %q %v", op, inc, v, body, ok)
	}
	op, inc, v, body, ok = parseChange("Rabc:43:5:room1:kinst:a:b")
	if !ok || op != 'R' || inc != "abc" || v != 43 || body != "5:room1:kinst:a:b" {
		t.Fatalf("remove: %c %q %d %q %v", op, inc, v, body, ok)
	}
	for _, bad := range []string{"", "X1:2:3", "Pabc", "Pabc:x:1", "Pabc:1"} {
		if _, _, _, _, ok := parseChange(bad); ok {
			t.Errorf("parseChange(%q) accepted", bad)
		}
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"redis://127.0.0.1:6379":            "redis://127.0.0.1:6379",
		"redis://user:pw@host:1/0":          "redis://user:xxxxx@host:1/0",
		"rediss://:secret@host:1?addr=h2:2": "rediss://:xxxxx@host:1?addr=h2:2",
		"redis://u:p%40ss@h:1?master_set=m": "redis://u:xxxxx@h:1?master_set=m",
		"unix:///run/redis.sock":            "unix:///run/redis.sock",
	} {
		if got := RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestPartitionOfKey(t *testing.T) {
	b := &Backend{opts: Options{Prefix: "fabric", Partitions: 16}}
	for _, topic := range []string{"a", "{x}", "}{", "room:7"} {
		p := b.partition(topic)
		if got := partitionOfKey(b.key(p, "t", topic)); got != p {
			t.Errorf("%q: partition %d read back as %d", topic, p, got)
		}
	}
}
