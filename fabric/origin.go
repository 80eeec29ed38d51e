package fabric

import (
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
}

// NewOriginPolicy returns the policy for origins: nil, empty or
// ["same-origin"] accepts only an Origin whose host is the request's Host;
// ["*"] accepts any; otherwise exactly the origins listed
// ("https://app.example.com").
func NewOriginPolicy(origins []string) *OriginPolicy {
	p := &OriginPolicy{}
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
	return stripDefaultPort(u.Host, u.Scheme) == stripDefaultPort(r.Host, u.Scheme)
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
