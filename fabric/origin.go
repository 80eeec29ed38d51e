package fabric

import (
	"net"
	"net/http"
	"net/url"
	"strings"
)

// OriginPolicy decides which browser origins may open a connection (a
// WebSocket upgrade, an SSE stream). Transports share it so that a rule
// holds whatever the transport.
type OriginPolicy struct {
	any     bool
	allowed map[string]bool // nil: same origin only
	hosts   map[string]bool // the Host values same-origin trusts
}

// DefaultAllowedHosts are the Host names a same-origin policy trusts when
// none are configured: this machine's loopback names, any port.
var DefaultAllowedHosts = []string{"localhost", "127.0.0.1", "::1"}

// NewOriginPolicy returns the policy for origins: nil, empty or
// ["same-origin"] accepts only an Origin whose host is the request's Host,
// and only when that Host is one of hosts (names or addresses, with or
// without a port; default DefaultAllowedHosts) — judging same-origin from
// the Host header alone would let a DNS-rebinding page in; ["*"] accepts
// any; otherwise exactly the origins listed ("https://app.example.com").
func NewOriginPolicy(origins, hosts []string) *OriginPolicy {
	p := &OriginPolicy{hosts: map[string]bool{}}
	if len(hosts) == 0 {
		hosts = DefaultAllowedHosts
	}
	for _, h := range hosts {
		if h = strings.ToLower(strings.TrimSpace(h)); h != "" {
			p.hosts[strings.Trim(h, "[]")] = true
		}
	}
	for _, o := range origins {
		switch o = strings.TrimRight(strings.TrimSpace(o), "/"); o {
		case "", "same-origin":
		case "*":
			p.any = true
		default:
			if p.allowed == nil {
				p.allowed = map[string]bool{}
			}
			p.allowed[o] = true
		}
	}
	return p
}

// Allowed reports whether r's Origin passes the policy. A request without an
// Origin (not a browser, or a same-origin GET some browsers send bare) is
// allowed only when authenticated says the connection is authenticated by
// other means (a Connect hook), or when any origin is.
func (p *OriginPolicy) Allowed(r *http.Request, authenticated bool) bool {
	if p.any {
		return true
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return authenticated
	}
	if p.allowed != nil {
		return p.allowed[strings.TrimRight(origin, "/")]
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	if !p.hostAllowed(r.Host) {
		return false
	}
	return stripDefaultPort(u.Host, u.Scheme) == stripDefaultPort(r.Host, u.Scheme)
}

// hostAllowed reports whether host (a Host header: name or address, with
// or without a port) is one same-origin trusts.
func (p *OriginPolicy) hostAllowed(host string) bool {
	h := strings.ToLower(host)
	if name, _, err := net.SplitHostPort(h); err == nil {
		h = name
	}
	return p.hosts[strings.Trim(h, "[]")]
}

func stripDefaultPort(host, scheme string) string {
	host = strings.ToLower(host)
	switch {
	case (scheme == "http" || scheme == "ws") && strings.HasSuffix(host, ":80"):
		return strings.TrimSuffix(host, ":80")
	case (scheme == "https" || scheme == "wss") && strings.HasSuffix(host, ":443"):
		return strings.TrimSuffix(host, ":443")
	}
	return host
}
