package server

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"syscall"

	"github.com/fabricrt/fabric/fabric"
)

// Protected mode (docs/security.md): with no authentication configured (no
// JWT keys, no Connect hook) and AllowAnonymous unset, the server serves
// clients on this host only. Listening beyond loopback that way is refused
// at start; a client that is not local (another address, or anything
// through a proxy) is refused with 403 saying why.

// protected reports whether the server runs in protected mode.
func (o *Options) protected() bool {
	return !o.Auth.Enabled() && o.Hooks.Connect == nil && !o.Auth.AllowAnonymous
}

// anonymousOpen reports whether anonymous clients beyond this host are
// served on purpose (AllowAnonymous): said at start and on /readyz.
func (o *Options) anonymousOpen() bool { return o.Auth.AllowAnonymous }

// errProtected explains protected mode's refusal to start.
var errProtected = errors.New("protected mode")

// validateExposure refuses a public listener beyond loopback in protected
// mode.
func (o *Options) validateExposure() error {
	if !o.protected() {
		return nil
	}
	addr := o.HTTP.Listen
	if o.HTTP.Listener != nil {
		addr = o.HTTP.Listener.Addr().String()
	}
	if loopbackAddr(addr) {
		return nil
	}
	return fmt.Errorf("%w: listening on %s, beyond this host, with no authentication: configure keys (--jwt-secret, --jwt-key-file or --jwks-file), or pass --allow-anonymous to serve anonymous clients on purpose (docs/security.md)", errProtected, addr)
}

// loopbackAddr reports whether a listen address binds loopback only: a
// loopback IP or "localhost". An empty host (":8080"), 0.0.0.0 or :: is
// every interface.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// protectedGate wraps a transport in protected mode: a client that is not
// local is refused with 403 and the reason.
func (s *Server) protectedGate(h http.Handler) http.Handler {
	if !s.opts.protected() {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.proxies.IsLoopback(r) {
			s.protectedRefused.Inc()
			http.Error(w, "fabric runs in protected mode: no authentication is configured, so only clients on the server's host may connect (configure JWT keys, or --allow-anonymous)", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// proxyPolicy builds the policy of HTTP.TrustedProxies.
func (o *Options) proxyPolicy() (*fabric.ProxyPolicy, error) {
	p, err := fabric.NewProxyPolicy(o.HTTP.TrustedProxies)
	if err != nil {
		return nil, fmt.Errorf("trusted proxies: %w", err)
	}
	return p, nil
}

// defaultMaxConnections is the connection cap when none is configured: the
// open-file limit less a tenth of it (at least 256 descriptors) for the
// backend, files and the HTTP API, so that past the cap a client gets a
// fast 503 rather than a kernel that refuses to accept. 0 (no cap) when
// the limit cannot be read or is practically unlimited.
func defaultMaxConnections() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<24 {
		return 0
	}
	n := int(rl.Cur)
	n -= max(256, n/10)
	return max(n, 0)
}

// certificate holds the TLS certificate and key of HTTP.TLSCert and
// HTTP.TLSKey, swapped by Reload: connections already open keep theirs,
// new handshakes get the new one.
type certificate struct {
	certFile, keyFile string
	cur               atomic.Pointer[tls.Certificate]
}

func newCertificate(certFile, keyFile string) (*certificate, error) {
	c := &certificate{certFile: certFile, keyFile: keyFile}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// load reads the files; on error the certificate in use stays.
func (c *certificate) load() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	c.cur.Store(&cert)
	return nil
}

// config is the listeners' TLS configuration: HTTP/1.1 only (WebSocket
// upgrades need it), TLS 1.2 or later.
func (c *certificate) config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return c.cur.Load(), nil
		},
	}
}
