package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// memOptions are testOptions on the memory backend (no NATS to start).
func memOptions(t *testing.T) Options {
	o := testOptions(t)
	o.Backend = BackendMemory
	return o
}

// TestProtectedModeRefusesPublicListen: with no authentication, listening
// beyond loopback refuses to start, saying how to go on; --allow-anonymous
// starts and says so on /readyz; keys start quietly.
func TestProtectedModeRefusesPublicListen(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, listen := range []string{"0.0.0.0:0", ":0"} {
		o := memOptions(t)
		o.HTTP.Listen = listen
		s, err := New(ctx, o)
		if err == nil {
			s.Close()
			t.Fatalf("listen %s with no authentication started", listen)
		}
		if !errors.Is(err, errProtected) || !strings.Contains(err.Error(), "--allow-anonymous") || !strings.Contains(err.Error(), "--jwt-secret") {
			t.Fatalf("listen %s: %v", listen, err)
		}
		if err := o.Validate(); !errors.Is(err, errProtected) {
			t.Fatalf("Validate (worker mode's check) of listen %s: %v", listen, err)
		}
	}

	o := memOptions(t)
	o.HTTP.Listen = "0.0.0.0:0"
	o.Auth.AllowAnonymous = true
	s := startServer(t, o)
	port := s.Addr()[strings.LastIndexByte(s.Addr(), ':'):]
	body := readyzBody(t, "http://127.0.0.1"+port+"/readyz")
	if body["anonymous"] != true {
		t.Fatalf("/readyz with --allow-anonymous: %v, want anonymous: true", body)
	}

	o = memOptions(t)
	o.HTTP.Listen = "0.0.0.0:0"
	o.Auth.Secrets = []string{strings.Repeat("k", 32)}
	s = startServer(t, o)
	port = s.Addr()[strings.LastIndexByte(s.Addr(), ':'):]
	if body := readyzBody(t, "http://127.0.0.1"+port+"/readyz"); body["anonymous"] != nil {
		t.Fatalf("/readyz with keys: %v", body)
	}
}

func readyzBody(t *testing.T, url string) map[string]any {
	t.Helper()
	var body map[string]any
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusOK {
				return body
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v %v", url, err, body)
		}
		time.Sleep(50 * time.Millisecond) // polling a probe until it is ready
	}
}

// TestProtectedModeLocalClientsOnly: on loopback with no authentication, a
// local client connects; one through a proxy (trusted or not) gets 403
// saying why, over WebSocket and SSE alike.
func TestProtectedModeLocalClientsOnly(t *testing.T) {
	o := memOptions(t)
	o.HTTP.TrustedProxies = []string{"127.0.0.1", "::1"}
	s := startServer(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dial(t, ctx, s, wsclient.Options{})
	for _, xff := range []string{"203.0.113.9", "127.0.0.1"} {
		h := wsclient.Options{Header: http.Header{"X-Forwarded-For": {xff}}}
		for _, url := range []string{"ws://" + s.Addr() + "/ws", "http://" + s.Addr() + "/events"} {
			_, err := wsclient.Dial(ctx, url, h)
			if err == nil || !strings.Contains(err.Error(), "403") {
				t.Fatalf("%s through a proxy for %s: %v, want 403", url, xff, err)
			}
		}
	}
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+s.Addr()+"/events?topic=x", nil)
	req.Header.Set("X-Forwarded-For", "203.0.113.9")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(msg), "protected mode") || !strings.Contains(string(msg), "--allow-anonymous") {
		t.Fatalf("refusal: %s %q", resp.Status, msg)
	}
	if v := gauge(t, s, "fabric_protected_refused_total"); v != 5 {
		t.Fatalf("fabric_protected_refused_total = %v, want 5", v)
	}

	// Anonymous on purpose: the proxied client gets in.
	o = memOptions(t)
	o.HTTP.TrustedProxies = []string{"127.0.0.1"}
	o.Auth.AllowAnonymous = true
	s = startServer(t, o)
	c, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", wsclient.Options{Header: http.Header{"X-Forwarded-For": {"203.0.113.9"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
}

// gauge reads one unlabelled counter or gauge from the server's registry.
func gauge(t *testing.T, s *Server, name string) float64 {
	t.Helper()
	mfs, err := s.gatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			m := mf.GetMetric()[0]
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestAllowedHosts: same-origin holds only for the hosts the server is
// known by: a page on a DNS-rebinding name (Host and Origin both evil) is
// refused, the configured name accepted.
func TestAllowedHosts(t *testing.T) {
	o := memOptions(t)
	o.HTTP.AllowedHosts = []string{"app.example.com"}
	s := startServer(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	upgrade := func(host string) int {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+s.Addr()+"/events?topic=x", nil)
		req.Host = host
		req.Header.Set("Origin", "http://"+host)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if st := upgrade("rebind.evil.example"); st != http.StatusForbidden {
		t.Fatalf("DNS-rebinding host: %d, want 403", st)
	}
	if st := upgrade("app.example.com"); st != http.StatusOK {
		t.Fatalf("allowed host: %d, want 200", st)
	}
}

// TestTLSReload: --tls-cert/--tls-key serve WSS; Reload (SIGHUP) swaps the
// certificate for new handshakes while a connection made with the old one
// goes on receiving.
func TestTLSReload(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writeCert(t, certFile, keyFile, "first")
	o := memOptions(t)
	o.HTTP.TLSCert, o.HTTP.TLSKey = certFile, keyFile
	s := startServer(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	servedCN := func() string {
		conn, err := tls.Dial("tcp", s.Addr(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if cn := servedCN(); cn != "first" {
		t.Fatalf("served %q", cn)
	}
	tlsc := &tls.Config{InsecureSkipVerify: true}
	old, err := wsclient.Dial(ctx, "wss://"+s.Addr()+"/ws", wsclient.Options{TLSConfig: tlsc})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Subscribe(ctx, "tls:news"); err != nil {
		t.Fatal(err)
	}
	if _, err := wsclient.Dial(ctx, "ws://"+s.Addr()+"/ws", wsclient.Options{}); err == nil {
		t.Fatal("plain WebSocket accepted on the TLS listener")
	}

	writeCert(t, certFile, keyFile, "second")
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if cn := servedCN(); cn != "second" {
		t.Fatalf("after Reload: served %q", cn)
	}
	if _, err := s.Node().Publish(ctx, "tls:news", "update", map[string]int{"n": 1}); err != nil {
		t.Fatal(err)
	}
	env, err := old.Next(ctx)
	if err != nil || env.Topic != "tls:news" {
		t.Fatalf("the connection made before Reload: %+v, %v", env, err)
	}
	sse, err := wsclient.Dial(ctx, "https://"+s.Addr()+"/events", wsclient.Options{TLSConfig: tlsc})
	if err != nil {
		t.Fatalf("SSE over HTTPS: %v", err)
	}
	sse.Close()

	// A broken file is refused and the certificate in use stays.
	if err := os.WriteFile(certFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err == nil {
		t.Fatal("Reload of a broken certificate succeeded")
	}
	if cn := servedCN(); cn != "second" {
		t.Fatalf("after a failed Reload: served %q", cn)
	}
}

// writeCert writes a self-signed certificate for 127.0.0.1 named cn.
func writeCert(t *testing.T, certFile, keyFile, cn string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultMaxConnections: with no --max-connections the cap sits below
// the open-file limit, leaving room for the backend and files.
func TestDefaultMaxConnections(t *testing.T) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	n := defaultMaxConnections()
	if rl.Cur > 1<<24 {
		if n != 0 {
			t.Fatalf("unlimited open files: cap %d, want none", n)
		}
		return
	}
	if n <= 0 || uint64(n)+256 > rl.Cur {
		t.Fatalf("open-file limit %d: default cap %d", rl.Cur, n)
	}
	t.Logf("open-file limit %d: default connection cap %d", rl.Cur, n)
}
