package memory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Cluster is fabric.ClusterView on a Backend: the Nodes registered with
// Backend.Cluster are the cluster. Counts are sums over them; SendToUser,
// Disconnect and Unsubscribe reach the user's connections on each of them.
// Every member answers at once, so answers are never partial.
type Cluster struct {
	b         *Backend
	node      *fabric.Node
	closeOnce sync.Once
}

// Cluster registers node as a member of the backend's cluster (until the
// returned Cluster is closed) and returns the cluster-wide view. A nil node
// registers nothing: the view then only sees the other members.
func (b *Backend) Cluster(node *fabric.Node) *Cluster {
	if node != nil {
		b.clusterMu.Lock()
		b.nodes[node]++
		b.clusterMu.Unlock()
	}
	return &Cluster{b: b, node: node}
}

// Close removes the node from the cluster (idempotent). The view keeps
// answering for the other members.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		if c.node == nil {
			return
		}
		c.b.clusterMu.Lock()
		if c.b.nodes[c.node]--; c.b.nodes[c.node] <= 0 {
			delete(c.b.nodes, c.node)
		}
		c.b.clusterMu.Unlock()
	})
	return nil
}

// members returns the registered nodes.
func (b *Backend) members() []*fabric.Node {
	b.clusterMu.Lock()
	defer b.clusterMu.Unlock()
	out := make([]*fabric.Node, 0, len(b.nodes))
	for n := range b.nodes {
		out = append(out, n)
	}
	return out
}

// Members returns the number of Nodes registered with the backend's cluster.
func (c *Cluster) Members() int {
	c.b.clusterMu.Lock()
	defer c.b.clusterMu.Unlock()
	return len(c.b.nodes)
}

// Connections implements fabric.ClusterView: the connections of every
// member.
func (c *Cluster) Connections(ctx context.Context) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("memory: cluster connections: %w", err)
	}
	n := 0
	for _, node := range c.b.members() {
		n += node.Connections()
	}
	return n, nil
}

// Subscribers implements fabric.ClusterView: the subscribers of topic on
// every member.
func (c *Cluster) Subscribers(ctx context.Context, topic string) (int, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("memory: cluster subscribers: %w", err)
	}
	n := 0
	for _, node := range c.b.members() {
		n += node.Subscribers(topic)
	}
	return n, nil
}

// SendToUser implements fabric.ClusterView: {topic, event, data} reaches
// every connection, on every member, whose fabric.UserKey is userID. Like a
// publish, it succeeds when nobody is connected.
func (c *Cluster) SendToUser(ctx context.Context, userID, topic, event string, data any) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory: SendToUser: %w", err)
	}
	if userID == "" {
		return errors.New("memory: SendToUser: empty user id")
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return err
	}
	if err := fabric.ValidateEvent(event); err != nil {
		return err
	}
	d, err := fabric.EncodeData(data)
	if err != nil {
		return err
	}
	match := func(userData any) bool {
		k, ok := fabric.UserKey(userData)
		return ok && k == userID
	}
	for _, node := range c.b.members() {
		if _, err := node.SendTo(match, topic, event, json.RawMessage(d)); err != nil {
			return fmt.Errorf("memory: SendToUser %q: %w", clip(userID), err)
		}
	}
	return nil
}

// Channels implements fabric.ClusterView: the topics with subscribers on
// any member that match pattern, with their summed counts, the first limit
// of them in byte order.
func (c *Cluster) Channels(ctx context.Context, pattern string, limit int) (map[string]int, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, fmt.Errorf("memory: cluster channels: %w", err)
	}
	if limit <= 0 {
		limit = fabric.DefaultChannelsLimit
	}
	limit = min(limit, fabric.MaxChannelsLimit)
	match := func(string) bool { return true }
	if pattern != "" {
		match = fabric.MatchTopics([]string{pattern})
	}
	counts := map[string]int{}
	for _, node := range c.b.members() {
		node.Topics(func(t string, n int) {
			if match(t) {
				counts[t] += n
			}
		})
	}
	if len(counts) <= limit {
		return counts, false, nil
	}
	keys := make([]string, 0, len(counts))
	for t := range counts {
		keys = append(keys, t)
	}
	slices.Sort(keys)
	out := make(map[string]int, limit)
	for _, t := range keys[:limit] {
		out[t] = counts[t]
	}
	return out, true, nil
}

// Info implements fabric.ClusterView: one description per member, sorted
// by ID. Members share the process, so their Uptime is the backend's and
// they have no Name.
func (c *Cluster) Info(ctx context.Context) ([]fabric.InstanceInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("memory: cluster info: %w", err)
	}
	version := moduleVersion()
	up := time.Since(c.b.start)
	var out []fabric.InstanceInfo
	for _, node := range c.b.members() {
		info := fabric.InstanceInfo{ID: node.ID(), Version: version, Connections: node.Connections(), Uptime: up}
		node.Topics(func(_ string, n int) {
			info.Topics++
			info.Subscriptions += n
		})
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b fabric.InstanceInfo) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Disconnect implements fabric.ClusterView: every connection, on every
// member, whose fabric.UserKey is userID is closed with code and reason.
func (c *Cluster) Disconnect(ctx context.Context, userID string, code int, reason string) (int, error) {
	clients, err := c.userClients(ctx, "Disconnect", userID)
	n := 0
	for _, cl := range clients {
		if !cl.Closed() {
			cl.Close(code, reason)
			n++
		}
	}
	return n, err
}

// Unsubscribe implements fabric.ClusterView: every connection, on every
// member, whose fabric.UserKey is userID is unsubscribed from topic.
func (c *Cluster) Unsubscribe(ctx context.Context, userID, topic string) (int, error) {
	if err := fabric.ValidateTopic(topic); err != nil {
		return 0, err
	}
	clients, err := c.userClients(ctx, "Unsubscribe", userID)
	n := 0
	for _, cl := range clients {
		if cl.Subscribed(topic) {
			cl.Node().Unsubscribe(cl, topic)
			n++
		}
	}
	return n, err
}

// userClients returns the connections of userID on every member.
func (c *Cluster) userClients(ctx context.Context, what, userID string) ([]*fabric.Client, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("memory: %s: %w", what, err)
	}
	if userID == "" {
		return nil, fmt.Errorf("memory: %s: empty user id", what)
	}
	var out []*fabric.Client
	for _, node := range c.b.members() {
		node.Each(func(cl *fabric.Client) bool {
			if k, ok := fabric.UserKey(cl.UserData()); ok && k == userID {
				out = append(out, cl)
			}
			return true
		})
	}
	return out, nil
}

// moduleVersion returns the version of the Fabric module in this binary's
// build information, or "".
func moduleVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	const path = "github.com/fabricrt/fabric"
	if bi.Main.Path == path {
		if v := bi.Main.Version; v != "(devel)" {
			return v
		}
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == path {
			return d.Version
		}
	}
	return ""
}

var _ fabric.ClusterView = (*Cluster)(nil)
