package server

import (
	"context"
	"fmt"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/redis"
)

// newRedisBackend connects to Redis (Options.Redis): the broker, and the
// history, presence, rate limits, cluster view and leases the other
// backend methods take from b.red.
func newRedisBackend(ctx context.Context, s *Server) (*backend, error) {
	n, age, err := s.replaySize()
	if err != nil {
		return nil, err
	}
	o := s.opts.Redis
	red, err := redis.New(ctx, redis.Options{
		URL:         o.URL,
		Prefix:      o.Prefix,
		Partitions:  o.Partitions,
		Sharded:     o.Sharded,
		MaxPerTopic: n,
		MaxAge:      age,
		Logger:      s.log,
	})
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	b := &backend{s: s, red: red}
	br := red.Broker()
	// The broker first, then the backend (its pub/sub connection, its
	// client): after every extension has closed (backend.close).
	b.br, b.brCloser = br, func() { _ = br.Close(); _ = red.Close() }
	b.collect(br)
	b.collect(red.Breaker())
	s.log.Info("redis backend", "url", redis.RedactURL(o.URL), "mode", string(red.Client().Mode()),
		"sharded_pubsub", red.Sharded(), "prefix", red.Options().Prefix, "partitions", red.Options().Partitions)
	return b, nil
}

// redisLimiter is the RPC rate limiter on Redis.
func (b *backend) redisLimiter(o RateLimitOptions) fabric.RateLimiter {
	return b.red.RateLimiter(redis.RateLimitOptions{Name: "rpc", Points: o.Points, Interval: o.Interval, BlockDuration: o.Block})
}

// redisCluster starts the cluster-wide view on Redis pub/sub.
func (b *backend) redisCluster(ctx context.Context) error {
	c, err := b.red.Cluster(ctx, b.s.node, redis.ClusterOptions{Logger: b.s.log})
	if err != nil {
		return fmt.Errorf("server: cluster view: %w", err)
	}
	b.cl = c
	b.closers = append(b.closers, func() { _ = c.Close() })
	return nil
}
