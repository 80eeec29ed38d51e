// Package embed runs a NATS server with JetStream inside the Fabric process
// and hands out in-process connections to it (no TCP hop, no client port
// unless one is asked for). The same server can route to peers (a NATS
// cluster of Fabric instances) or attach to an existing deployment as a
// leaf node.
package embed

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"
)

// DefaultDataDir is where the JetStream store lives unless Options.DataDir says otherwise.
const DefaultDataDir = "./fabric-data"

// Options configures an embedded server. The zero value is a standalone
// server with JetStream under ./fabric-data and no network listener at all.
type Options struct {
	// Name is the server name; it must be unique in a cluster and stable
	// across restarts (JetStream peers are identified by it). Default: a
	// name generated once and kept in the data dir.
	Name string
	// DataDir holds the JetStream store and the instance lock.
	DataDir string
	// ClientListen ("host:port") opens a NATS client port; empty opens none.
	ClientListen string
	// MonitorListen ("host:port") opens nats-server's HTTP monitoring
	// endpoints (/varz, /jsz, /routez, ...); empty opens none.
	MonitorListen string
	// ClusterName names the NATS cluster this instance routes into.
	ClusterName string
	// ClusterListen ("host:port") is where peers connect their routes.
	ClusterListen string
	// Routes are peers' cluster URLs (nats://host:port).
	Routes []string
	// LeafRemotes attach this server as a leaf node to existing NATS servers
	// (their leafnode URLs, nats-leaf://host:port or nats://host:port).
	LeafRemotes []string
	// LeafCredentials is a .creds file for the leaf connection, optional.
	LeafCredentials string
	// LeafDeny are subjects kept off the leaf connection both ways: state
	// of this server's own JetStream domain (history streams, KV buckets)
	// that the hub's streams of the same names must not capture, nor this
	// server's capture the hub's.
	LeafDeny []string
	// LeafListen ("host:port") accepts leaf connections from other servers.
	LeafListen string
	// GatewayListen ("host:port") accepts gateway connections from other
	// clusters: with it, this instance's cluster (ClusterName) is one
	// cluster of a supercluster. Every instance of a cluster that takes part
	// needs it.
	GatewayListen string
	// Gateways are the other clusters of the supercluster and their gateway
	// URLs (an instance needs one URL of each; the rest are gossiped).
	Gateways []Gateway
	// Token, when set, is required from every client of the client port
	// (ClientListen); the in-process connections present it by themselves.
	Token string
	// NoAdvertise keeps the client port out of the cluster's gossip, so that
	// clients of other instances never learn it (a private port, such as
	// the one worker processes use).
	NoAdvertise bool
	// JetStreamDomain separates this server's JetStream from a hub's. When
	// LeafRemotes are set and it is empty, the server name is used.
	JetStreamDomain string
	// SyncAlways fsyncs every JetStream write before acknowledging it (the
	// default syncs every two minutes: faster, but an OS crash can lose
	// acknowledged messages).
	SyncAlways bool
	// MaxPayload is the largest message NATS accepts (default 1 MiB).
	MaxPayload int32
	// ReadyTimeout bounds the wait for the server to accept connections
	// (default 30s).
	ReadyTimeout time.Duration
	// Logger receives the server's notices, warnings and errors.
	Logger *slog.Logger
	// Debug also forwards NATS debug logs.
	Debug bool
}

// Gateway is one remote cluster of a supercluster.
type Gateway struct {
	// Name is the remote cluster's name (its ClusterName).
	Name string
	// URLs are gateway URLs of servers in it (nats://host:7222).
	URLs []string
}

// ParseGateways reads "name=url,name=url2,other=url3" (spaces ignored):
// each item names a remote cluster and one of its gateway URLs; a name may
// repeat to give more URLs.
func ParseGateways(items []string) ([]Gateway, error) {
	var out []Gateway
	index := map[string]int{}
	for _, it := range items {
		it = strings.TrimSpace(it)
		if it == "" {
			continue
		}
		name, u, ok := strings.Cut(it, "=")
		name, u = strings.TrimSpace(name), strings.TrimSpace(u)
		if !ok || name == "" || u == "" {
			return nil, fmt.Errorf("embed: gateway %q: want NAME=nats://host:port", it)
		}
		if pu, err := url.Parse(u); err != nil || pu.Host == "" {
			return nil, fmt.Errorf("embed: gateway %q: %q is not a nats://host:port URL", it, u)
		}
		if i, seen := index[name]; seen {
			out[i].URLs = append(out[i].URLs, u)
			continue
		}
		index[name] = len(out)
		out = append(out, Gateway{Name: name, URLs: []string{u}})
	}
	return out, nil
}

// Server is a running embedded NATS server.
type Server struct {
	ns   *server.Server
	opts Options
	lock *os.File
}

// Start starts the server and waits until it accepts connections.
func Start(ctx context.Context, o Options) (*Server, error) {
	if o.DataDir == "" {
		o.DataDir = DefaultDataDir
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("embed: data dir: %w", err)
	}
	lock, err := lockDir(o.DataDir)
	if err != nil {
		return nil, err
	}
	s := &Server{opts: o, lock: lock}
	if err := s.start(ctx); err != nil {
		s.unlock()
		return nil, err
	}
	return s, nil
}

func (s *Server) start(ctx context.Context) error {
	o := &s.opts
	if o.Name == "" {
		name, err := stableName(o.DataDir)
		if err != nil {
			return err
		}
		o.Name = name
	}
	so := &server.Options{
		ServerName: o.Name,
		JetStream:  true,
		StoreDir:   o.DataDir,
		NoSigs:     true,
		SyncAlways: o.SyncAlways,
		MaxPayload: o.MaxPayload,
	}
	if o.Token != "" {
		so.Authorization = o.Token
	}
	superclustered := o.GatewayListen != "" || len(o.Gateways) > 0
	clustered := o.ClusterListen != "" || len(o.Routes) > 0 || superclustered
	switch {
	case o.ClientListen == "" && clustered:
		// nats-server starts routing only after its client accept loop has
		// opened (server.go: StartRouting waits on clientListenReady, which
		// DontListen never closes), so a clustered server gets a client
		// port on a random loopback address that nothing advertises.
		so.Host, so.Port = "127.0.0.1", -1
		so.Cluster.NoAdvertise = true
	case o.ClientListen == "":
		so.DontListen = true
	default:
		host, port, err := splitHostPort(o.ClientListen)
		if err != nil {
			return fmt.Errorf("embed: client listen: %w", err)
		}
		so.Host, so.Port = host, port
		so.Cluster.NoAdvertise = o.NoAdvertise
	}
	if clustered {
		if o.ClusterName == "" {
			o.ClusterName = "fabric"
		}
		so.Cluster.Name = o.ClusterName
		if o.ClusterListen != "" {
			host, port, err := splitHostPort(o.ClusterListen)
			if err != nil {
				return fmt.Errorf("embed: cluster listen: %w", err)
			}
			so.Cluster.Host, so.Cluster.Port = host, port
		}
		for _, r := range o.Routes {
			u, err := url.Parse(strings.TrimSpace(r))
			if err != nil || u.Host == "" {
				return fmt.Errorf("embed: route %q: not a nats://host:port URL", r)
			}
			so.Routes = append(so.Routes, u)
		}
	}
	if superclustered {
		if o.GatewayListen == "" {
			return errors.New("embed: gateways need a gateway listener (GatewayListen) on every instance of the cluster")
		}
		host, port, err := splitHostPort(o.GatewayListen)
		if err != nil {
			return fmt.Errorf("embed: gateway listen: %w", err)
		}
		// A cluster's gateway name is its cluster name (nats-server
		// refuses a difference).
		so.Gateway.Name, so.Gateway.Host, so.Gateway.Port = o.ClusterName, host, port
		for _, g := range o.Gateways {
			if g.Name == o.ClusterName {
				continue // this cluster: the URL of a sibling, harmless to leave out
			}
			rg := &server.RemoteGatewayOpts{Name: g.Name}
			for _, raw := range g.URLs {
				u, err := url.Parse(strings.TrimSpace(raw))
				if err != nil || u.Host == "" {
					return fmt.Errorf("embed: gateway %s URL %q: not a nats://host:port URL", g.Name, raw)
				}
				rg.URLs = append(rg.URLs, u)
			}
			so.Gateway.Gateways = append(so.Gateway.Gateways, rg)
		}
	}
	if superclustered && (o.LeafListen != "" || len(o.LeafRemotes) > 0) {
		// nats-server wants the system account named when leaf nodes and
		// gateways meet; this is the one it creates anyway.
		so.SystemAccount = server.DEFAULT_SYSTEM_ACCOUNT
		so.Accounts = append(so.Accounts, server.NewAccount(server.DEFAULT_SYSTEM_ACCOUNT))
	}
	if o.MonitorListen != "" {
		host, port, err := splitHostPort(o.MonitorListen)
		if err != nil {
			return fmt.Errorf("embed: monitor listen: %w", err)
		}
		so.HTTPHost, so.HTTPPort = host, port
	}
	if o.LeafListen != "" {
		host, port, err := splitHostPort(o.LeafListen)
		if err != nil {
			return fmt.Errorf("embed: leaf listen: %w", err)
		}
		so.LeafNode.Host, so.LeafNode.Port = host, port
	}
	for _, r := range o.LeafRemotes {
		u, err := url.Parse(strings.TrimSpace(r))
		if err != nil || u.Host == "" {
			return fmt.Errorf("embed: leaf remote %q: not a nats://host:port URL", r)
		}
		so.LeafNode.Remotes = append(so.LeafNode.Remotes, &server.RemoteLeafOpts{
			URLs: []*url.URL{u}, Credentials: o.LeafCredentials,
			DenyImports: o.LeafDeny, DenyExports: o.LeafDeny,
		})
	}
	if o.JetStreamDomain == "" && len(o.LeafRemotes) > 0 {
		o.JetStreamDomain = o.Name
	}
	so.JetStreamDomain = o.JetStreamDomain

	ns, err := server.NewServer(so)
	if err != nil {
		return fmt.Errorf("embed: configure NATS server: %w", err)
	}
	ns.SetLoggerV2(&natsLog{l: o.Logger, debug: o.Debug}, o.Debug, false, false)
	go ns.Start()
	deadline := time.Now().Add(o.ReadyTimeout)
	for !ns.ReadyForConnections(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			ns.Shutdown()
			return fmt.Errorf("embed: NATS server not ready after %s", o.ReadyTimeout)
		}
		if err := ctx.Err(); err != nil {
			ns.Shutdown()
			return err
		}
	}
	s.ns = ns
	return nil
}

// NATS returns the underlying nats-server.
func (s *Server) NATS() *server.Server { return s.ns }

// Name returns the server name.
func (s *Server) Name() string { return s.opts.Name }

// Options returns the options the server runs with, defaults filled in.
func (s *Server) Options() Options { return s.opts }

// Connect returns an in-process client connection to the server.
func (s *Server) Connect(opts ...nats.Option) (*nats.Conn, error) {
	log := s.opts.Logger
	if s.opts.Token != "" {
		opts = append([]nats.Option{nats.Token(s.opts.Token)}, opts...)
	}
	opts = append([]nats.Option{
		nats.InProcessServer(s.ns), nats.Name("fabric-" + s.opts.Name), nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("in-process NATS connection lost; messages in flight to it are lost", "err", err)
			}
		}),
		nats.ReconnectHandler(func(*nats.Conn) { log.Info("in-process NATS connection restored") }),
	}, opts...)
	nc, err := nats.Connect("", opts...)
	if err != nil {
		return nil, fmt.Errorf("embed: in-process connect: %w", err)
	}
	return nc, nil
}

// ClientURL returns nats://host:port of the client listener, or "" if none.
func (s *Server) ClientURL() string {
	if s.opts.ClientListen == "" {
		return ""
	}
	return hostURL("nats", s.ns.Addr())
}

// ClusterURL returns the route URL peers use, or "" without a cluster listener.
func (s *Server) ClusterURL() string {
	if a := s.ns.ClusterAddr(); a != nil {
		return hostURL("nats", a)
	}
	return ""
}

// GatewayURL returns the gateway URL other clusters connect to, or "".
func (s *Server) GatewayURL() string {
	if a := s.ns.GatewayAddr(); a != nil && (s.opts.GatewayListen != "" || len(s.opts.Gateways) > 0) {
		return hostURL("nats", a)
	}
	return ""
}

// LeafURL returns the leafnode URL other servers attach to, or "".
func (s *Server) LeafURL() string {
	if s.opts.LeafListen == "" {
		return ""
	}
	v, err := s.ns.Varz(nil)
	if err != nil || v.LeafNode.Port <= 0 {
		return ""
	}
	return "nats://" + net.JoinHostPort(v.LeafNode.Host, strconv.Itoa(v.LeafNode.Port))
}

// Status is what the server knows about its cluster, for readiness checks.
type Status struct {
	// Clustered is true when routes, a cluster listener or gateways are
	// configured.
	Clustered bool
	// Peers is how many other servers of the cluster this one has routes to.
	Peers int
	// Gateways is how many remote clusters this one has an outbound gateway
	// to; GatewaysConfigured is how many it was told about.
	Gateways, GatewaysConfigured int
	// LeafNodes is how many leaf node connections it has (either way).
	LeafNodes int
	// JetStream is false when JetStream is off (a failure to start it).
	JetStream bool
	// MetaLeader names the JetStream meta leader ("" while there is none;
	// this server's name when it runs JetStream alone).
	MetaLeader string
	// MetaSize is the JetStream meta group's known size (1 when alone).
	MetaSize int
}

func (s *Server) remoteGateways() int {
	n := 0
	for _, g := range s.opts.Gateways {
		if g.Name != s.opts.ClusterName {
			n++
		}
	}
	return n
}

// Status reports the server's cluster state (cheap: no network round trip).
func (s *Server) Status() Status {
	o := s.opts
	st := Status{
		Clustered:          o.ClusterListen != "" || len(o.Routes) > 0 || o.GatewayListen != "",
		Peers:              s.ns.NumRemotes(),
		Gateways:           s.ns.NumOutboundGateways(),
		GatewaysConfigured: s.remoteGateways(),
		LeafNodes:          s.ns.NumLeafNodes(),
	}
	jsz, err := s.ns.Jsz(&server.JSzOptions{})
	if err != nil || jsz == nil || jsz.Disabled {
		return st
	}
	st.JetStream = true
	if jsz.Meta == nil {
		st.MetaLeader, st.MetaSize = s.opts.Name, 1
		return st
	}
	st.MetaLeader, st.MetaSize = jsz.Meta.Leader, jsz.Meta.Size
	return st
}

// Shutdown stops the server, waits for it, and releases the data dir.
func (s *Server) Shutdown() {
	if s.ns != nil {
		s.ns.Shutdown()
		s.ns.WaitForShutdown()
	}
	s.unlock()
}

func (s *Server) unlock() {
	if s.lock != nil {
		_ = unix.Flock(int(s.lock.Fd()), unix.LOCK_UN)
		_ = s.lock.Close()
		s.lock = nil
	}
}

// lockDir takes an exclusive lock on dir/fabric.lock so that two instances
// never share one JetStream store.
func lockDir(dir string) (*os.File, error) {
	p := filepath.Join(dir, "fabric.lock")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("embed: lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		owner, _ := os.ReadFile(p)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("embed: data dir %s is in use by another Fabric instance (pid %s); give each instance its own --data", dir, strings.TrimSpace(string(owner)))
		}
		return nil, fmt.Errorf("embed: lock %s: %w", p, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

// stableName returns the server name kept in dir, creating it on first use.
func stableName(dir string) (string, error) {
	p := filepath.Join(dir, "server-name")
	if b, err := os.ReadFile(p); err == nil {
		if n := strings.TrimSpace(string(b)); n != "" {
			return n, nil
		}
	}
	var r [4]byte
	_, _ = rand.Read(r[:])
	host, _ := os.Hostname()
	host = strings.Map(func(c rune) rune {
		if c == '.' || c == ' ' || c == '*' || c == '>' {
			return '-'
		}
		return c
	}, host)
	name := "fabric-" + host + "-" + hex.EncodeToString(r[:])
	if err := os.WriteFile(p, []byte(name+"\n"), 0o640); err != nil {
		return "", fmt.Errorf("embed: save server name: %w", err)
	}
	return name, nil
}

func splitHostPort(hp string) (string, int, error) {
	host, ps, err := net.SplitHostPort(hp)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(ps)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %w", ps, err)
	}
	if port == 0 {
		port = -1 // nats-server: -1 picks a random free port
	}
	if host == "" {
		host = "0.0.0.0"
	}
	return host, port, nil
}

func hostURL(scheme string, a net.Addr) string {
	if a == nil {
		return ""
	}
	return scheme + "://" + a.String()
}

// natsLog forwards nats-server logs to slog.
type natsLog struct {
	l     *slog.Logger
	debug bool
}

func (n *natsLog) Noticef(f string, v ...any) { n.l.Info("nats: " + fmt.Sprintf(f, v...)) }
func (n *natsLog) Warnf(f string, v ...any)   { n.l.Warn("nats: " + fmt.Sprintf(f, v...)) }
func (n *natsLog) Fatalf(f string, v ...any)  { n.l.Error("nats: " + fmt.Sprintf(f, v...)) }
func (n *natsLog) Errorf(f string, v ...any)  { n.l.Error("nats: " + fmt.Sprintf(f, v...)) }
func (n *natsLog) Debugf(f string, v ...any) {
	if n.debug {
		n.l.Debug("nats: " + fmt.Sprintf(f, v...))
	}
}
func (n *natsLog) Tracef(string, ...any) {}
