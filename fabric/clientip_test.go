package fabric

import (
	"net/http/httptest"
	"testing"
)

func TestProxyPolicy(t *testing.T) {
	p, err := NewProxyPolicy([]string{"10.0.0.0/8", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		peer, xff string
		want      string
		loopback  bool
	}{
		{"127.0.0.1:1", "", "127.0.0.1", true},
		{"[::1]:1", "", "::1", true},
		{"127.0.0.1:1", "203.0.113.9", "203.0.113.9", false},            // a trusted proxy on this host
		{"127.0.0.1:1", "127.0.0.1", "127.0.0.1", false},                // proxied: never loopback
		{"203.0.113.7:1", "127.0.0.1", "203.0.113.7", false},            // not a trusted proxy: its header is ignored
		{"10.1.1.1:1", "198.51.100.1, 10.2.2.2", "198.51.100.1", false}, // two trusted hops
		{"[::1]:1", "198.51.100.1", "::1", false},                       // ::1 is not trusted here
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = tc.peer
		if tc.xff != "" {
			r.Header.Set("X-Forwarded-For", tc.xff)
		}
		a, _ := p.ClientAddr(r)
		if a.String() != tc.want || p.IsLoopback(r) != tc.loopback {
			t.Errorf("peer %s, XFF %q: %s loopback=%v; want %s loopback=%v", tc.peer, tc.xff, a, p.IsLoopback(r), tc.want, tc.loopback)
		}
	}
	var none *ProxyPolicy // trusts nobody
	r := httptest.NewRequest("GET", "/", nil)
	r.RemoteAddr = "127.0.0.1:5"
	r.Header.Set("X-Forwarded-For", "203.0.113.9")
	if a, proxied := none.ClientAddr(r); a.String() != "127.0.0.1" || !proxied || none.IsLoopback(r) {
		t.Errorf("nil policy: %s proxied=%v loopback=%v", a, proxied, none.IsLoopback(r))
	}
	if _, err := NewProxyPolicy([]string{"not an address"}); err == nil {
		t.Error("a bad proxy was accepted")
	}
}
