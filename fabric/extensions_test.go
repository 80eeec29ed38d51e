package fabric

import "testing"

type idUser struct{ ID int }

type userIDer struct{}

func (userIDer) UserID() string { return "u7" }

func TestUserKey(t *testing.T) {
	for _, tc := range []struct {
		in   any
		want string
		ok   bool
	}{
		{nil, "", false}, {"", "", false}, {"alice", "alice", true},
		{map[string]any{"id": "bob"}, "bob", true}, {map[string]any{"id": 42.0}, "42", true},
		{map[string]any{"name": "x"}, "", false}, {idUser{ID: 9}, "9", true}, {&idUser{ID: 10}, "10", true},
		{userIDer{}, "u7", true}, {struct{ Name string }{"x"}, "", false}, {(*idUser)(nil), "", false}, {3, "", false},
	} {
		got, ok := UserKey(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("UserKey(%#v) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestMatchTopics(t *testing.T) {
	m := MatchTopics([]string{"room:*", " lobby ", "a*b*c", ""})
	for topic, want := range map[string]bool{
		"room:1": true, "room:": true, "room:a/b.c": true, "rooms": false, "lobby": true, "lobby2": false,
		"abc": true, "axxbyyc": true, "axxbyy": false, "": false, "xroom:1": false,
	} {
		if got := m(topic); got != want {
			t.Errorf("match %q = %v, want %v", topic, got, want)
		}
	}
	if MatchTopics(nil)("anything") {
		t.Error("no patterns matched a topic")
	}
}

func TestRateLimitedError(t *testing.T) {
	e := RateLimitedError(1500 * 1e6)
	if e.Code != CodeRateLimited || e.RetryAfter != 1500 {
		t.Fatalf("%+v", e)
	}
	if RateLimitedError(0).RetryAfter != 1 {
		t.Fatal("retryAfter below 1ms")
	}
}
