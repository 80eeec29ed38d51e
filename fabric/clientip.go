package fabric

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// ProxyPolicy finds the address a request really comes from: the peer, or,
// when the peer is a trusted proxy, the last address in X-Forwarded-For
// that is not one of the trusted proxies. The zero value trusts no proxy.
// Rules that depend on where a request comes from (the loopback rule of the
// key-less API, connections per IP, rate limits by IP) use it.
type ProxyPolicy struct {
	trusted []netip.Prefix
}

// NewProxyPolicy returns a policy trusting the proxies in cidrs (addresses
// or CIDR prefixes: "10.0.0.0/8", "127.0.0.1").
func NewProxyPolicy(cidrs []string) (*ProxyPolicy, error) {
	p := &ProxyPolicy{}
	for _, s := range cidrs {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "/") {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("fabric: trusted proxy %q: %w", s, err)
			}
			s = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()).String()
		}
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("fabric: trusted proxy %q: %w", s, err)
		}
		p.trusted = append(p.trusted, pfx.Masked())
	}
	return p, nil
}

func (p *ProxyPolicy) trustedAddr(a netip.Addr) bool {
	if p == nil {
		return false
	}
	a = a.Unmap()
	for _, pfx := range p.trusted {
		if pfx.Contains(a) {
			return true
		}
	}
	return false
}

// ClientAddr returns the address r comes from, and whether it came through
// a proxy (a request with forwarding headers, trusted or not). A peer that
// is not a trusted proxy is the client, whatever headers it sends.
func (p *ProxyPolicy) ClientAddr(r *http.Request) (addr netip.Addr, proxied bool) {
	peer := peerAddr(r.RemoteAddr)
	proxied = r.Header.Get("X-Forwarded-For") != "" || r.Header.Get("Forwarded") != "" || r.Header.Get("X-Real-Ip") != ""
	if !peer.IsValid() || !p.trustedAddr(peer) {
		return peer, proxied
	}
	hops := r.Header.Values("X-Forwarded-For")
	var all []string
	for _, h := range hops {
		all = append(all, strings.Split(h, ",")...)
	}
	for i := len(all) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(all[i]))
		if err != nil {
			return peer, true // a hop we cannot read: stop at the proxy
		}
		if !p.trustedAddr(a) {
			return a.Unmap(), true
		}
		peer = a.Unmap()
	}
	return peer, proxied
}

// IsLoopback reports whether r comes from this host: its client address is
// loopback and it did not come through a proxy. Behind a reverse proxy on
// the same host every peer is loopback; a proxied request is never taken
// for a local one.
func (p *ProxyPolicy) IsLoopback(r *http.Request) bool {
	a, proxied := p.ClientAddr(r)
	return a.IsValid() && a.IsLoopback() && !proxied
}

// ClientAddrString is ClientAddr as host:port text for Node.Connect (the
// port is the peer's; "" when unknown).
func (p *ProxyPolicy) ClientAddrString(r *http.Request) string {
	a, _ := p.ClientAddr(r)
	if !a.IsValid() {
		return r.RemoteAddr
	}
	_, port, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		port = "0"
	}
	return net.JoinHostPort(a.String(), port)
}

func peerAddr(remote string) netip.Addr {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr().Unmap()
	}
	if a, err := netip.ParseAddr(remote); err == nil {
		return a.Unmap()
	}
	return netip.Addr{}
}

// ClientAddr is where r really comes from under the node's proxy policy
// (Config.Proxies), as host:port for Connect: what KeyByIP and limits by
// address see.
func (n *Node) ClientAddr(r *http.Request) string { return n.cfg.Proxies.ClientAddrString(r) }
