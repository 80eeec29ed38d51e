package server

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"

	"github.com/fabricrt/fabric/embed"
)

// MaxAutoReplicas is the replication Fabric picks by itself for its streams
// and buckets in a cluster big enough (Options.Replay.Replicas and
// NATS.KVReplicas left at 0): min(MaxAutoReplicas, ClusterSize).
const MaxAutoReplicas = 3

// ClusterSize is the size of the cluster an instance routed to routes is
// a member of: the distinct peers the routes name plus the instance itself
// (a route to itself, usual when every instance gets the same list, is not
// a peer). clusterListen is the instance's own cluster address. Without
// routes the size is 1.
func ClusterSize(routes []string, clusterListen string) int {
	peers := map[string]bool{}
	for _, r := range routes {
		u, err := url.Parse(strings.TrimSpace(r))
		if err != nil || u.Host == "" {
			continue
		}
		hp := strings.ToLower(u.Host)
		if isSelfRoute(u, clusterListen) {
			continue
		}
		peers[hp] = true
	}
	return 1 + len(peers)
}

// isSelfRoute reports whether the route u points at this instance's own
// cluster listener: the same address, or the same port on a host that is
// this machine (a local interface address, or a name whose first label is
// the hostname, as a StatefulSet's fabric-0.fabric-cluster is for pod
// fabric-0).
func isSelfRoute(u *url.URL, clusterListen string) bool {
	if clusterListen == "" {
		return false
	}
	lhost, lport, err := net.SplitHostPort(clusterListen)
	if err != nil {
		return false
	}
	host, port := u.Hostname(), u.Port()
	if port != lport {
		return false
	}
	if strings.EqualFold(host, lhost) {
		return true
	}
	if hn, err := os.Hostname(); err == nil && hn != "" {
		first, _, _ := strings.Cut(host, ".")
		if strings.EqualFold(first, hn) || strings.EqualFold(host, hn) {
			return true
		}
	}
	if strings.EqualFold(host, "localhost") {
		host = "127.0.0.1"
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return false
	}
	if lip := net.ParseIP(lhost); lip != nil && !lip.IsUnspecified() {
		return ip.Equal(lip)
	}
	// Listening on every address: any address of this machine is itself.
	if ip.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
			return true
		}
	}
	return false
}

// clusterSize is the size of this instance's cluster (from Embed.Routes,
// which worker processes receive too).
func (o *Options) clusterSize() int {
	return ClusterSize(o.Embed.Routes, o.Embed.ClusterListen)
}

// autoReplicas is configured when set, else min(MaxAutoReplicas, size).
func autoReplicas(configured, size int) int {
	if configured > 0 {
		return configured
	}
	return max(1, min(MaxAutoReplicas, size))
}

// HistoryReplicas is the replication of the history streams: Replay.Replicas,
// or min(3, cluster size) when it is 0.
func (o *Options) HistoryReplicas() int { return autoReplicas(o.Replay.Replicas, o.clusterSize()) }

// KVReplicas is the replication of the presence, rate-limit and lease
// state: NATS.KVReplicas, or min(3, cluster size) when it is 0.
func (o *Options) KVReplicas() int { return autoReplicas(o.NATS.KVReplicas, o.clusterSize()) }

// EmbedConfig returns the embedded NATS server's options that o describes
// (defaults filled in; no Logger): what New starts, and what the worker
// mode's primary process starts in its place.
func (o Options) EmbedConfig() (embed.Options, error) {
	o = o.withDefaults()
	gws, err := o.gateways()
	if err != nil {
		return embed.Options{}, err
	}
	e := o.Embed
	return embed.Options{
		Name:            e.Name,
		DataDir:         e.DataDir,
		ClientListen:    e.Listen,
		MonitorListen:   e.Monitor,
		ClusterName:     e.ClusterName,
		ClusterListen:   e.ClusterListen,
		Routes:          e.Routes,
		LeafRemotes:     e.LeafRemotes,
		LeafCredentials: e.LeafCreds,
		LeafDeny:        leafDeny(o.NATS.SubjectPrefix),
		LeafListen:      e.LeafListen,
		GatewayListen:   e.GatewayListen,
		Gateways:        gws,
		JetStreamDomain: e.JSDomain,
		SyncAlways:      e.SyncAlways,
	}, nil
}

// leafDeny are the subjects of a prefix's state that stay on their side of
// a leaf connection: a leaf node runs its own JetStream domain, whose
// history streams and KV buckets have the hub's names and subjects; were
// these subjects to cross, each side's streams would store (and the
// history republish, under its own seq) the other side's writes. Live
// topics (<prefix>.t.>), the cluster view and direct messages cross.
func leafDeny(prefix string) []string {
	b := streamNameToken(prefix)
	return []string{
		prefix + ".h.>",     // history partitions
		prefix + ".rlc.>",   // rate-limit counters
		prefix + ".rlctl.>", // rate-limit control
		"$KV." + b + "_presence.>",
		"$KV." + b + "_leases.>",
		"$KV." + b + "_rl_rpc_bans.>",
	}
}

// gateways parses Embed.Gateways ("name=url" items).
func (o *Options) gateways() ([]embed.Gateway, error) {
	return embed.ParseGateways(o.Embed.Gateways)
}

// Validate reports the first setting of o (defaults filled in) that New
// would refuse, without starting anything: the worker mode's primary checks
// its workers' options before it starts them.
func (o Options) Validate() error {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return nil
}
