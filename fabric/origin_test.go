package fabric

import (
	"net/http/httptest"
	"testing"
)

// TestOriginPolicy: same-origin is judged against the hosts the server is
// known by, not the Host header alone (DNS rebinding); lists and * as
// documented.
func TestOriginPolicy(t *testing.T) {
	for _, tc := range []struct {
		origins, hosts []string
		host, origin   string
		auth, want     bool
	}{
		{nil, nil, "127.0.0.1:8080", "http://127.0.0.1:8080", false, true},
		{nil, nil, "localhost:8080", "http://localhost:8080", false, true},
		{nil, nil, "[::1]:8080", "http://[::1]:8080", false, true},
		{nil, nil, "rebind.evil.example:8080", "http://rebind.evil.example:8080", false, false}, // DNS rebinding
		{nil, nil, "127.0.0.1:8080", "http://evil.example", false, false},
		{nil, []string{"app.example.com"}, "app.example.com", "https://app.example.com", false, true},
		{nil, []string{"app.example.com"}, "APP.example.com:443", "https://app.example.com", false, true},
		{nil, []string{"app.example.com"}, "127.0.0.1:8080", "http://127.0.0.1:8080", false, false},
		{[]string{"https://app.example.com"}, nil, "anything", "https://app.example.com/", false, true},
		{[]string{"https://app.example.com"}, nil, "anything", "https://other.example.com", false, false},
		{[]string{"*"}, nil, "anything", "http://x", false, true},
		{nil, nil, "127.0.0.1:8080", "", false, false}, // no Origin: only with a Connect hook
		{nil, nil, "127.0.0.1:8080", "", true, true},
	} {
		r := httptest.NewRequest("GET", "/ws", nil)
		r.Host = tc.host
		if tc.origin != "" {
			r.Header.Set("Origin", tc.origin)
		}
		if got := NewOriginPolicy(tc.origins, tc.hosts).Allowed(r, tc.auth); got != tc.want {
			t.Errorf("origins %v hosts %v, Host %q Origin %q: %v, want %v", tc.origins, tc.hosts, tc.host, tc.origin, got, tc.want)
		}
	}
}
