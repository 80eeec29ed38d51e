package memory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/fabricrt/fabric/fabric"
)

// Cluster is fabric.ClusterView on a Backend: the Nodes registered with
// Backend.Cluster are the cluster. Counts are sums over them; SendToUser
// reaches the user's connections on each of them.
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

var _ fabric.ClusterView = (*Cluster)(nil)
