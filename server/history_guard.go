package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
)

// historyBreakerReset is how long a history circuit stays open before a
// probe: about a JetStream stream's leader election, so that a partition
// whose leader died on a killed instance takes persistent publishes back
// as soon as its new leader answers.
const historyBreakerReset = 2 * time.Second

// historyReadAttempts is how many times a history read (a resume's, the
// API's) is tried while the history is unavailable, and historyReadPause
// the pause between tries: one read gives up after about 5s (the
// jetstream package's bound), and a stream whose leader went away
// (killed, or shutting down in a rolling restart) can take a Raft
// election timeout (4 to 9s in nats-server) to answer again. Without the
// retries such a resume ends with recovered:false and the client misses
// what was stored meanwhile.
const (
	historyReadAttempts = 3
	historyReadPause    = 250 * time.Millisecond
)

// guardHistory wraps h: reads are retried through a leader election (see
// historyReadAttempts), and circuit breakers guard appends
// (Options.Admission.HistoryBreaker consecutive outages open one; negative:
// none): on NATS one per partition stream (breaker "history:<stream>"), so
// that the partitions whose leader is being elected after an instance died
// fail fast alone while the others go on; elsewhere one for the whole
// history (breaker "history").
func (s *Server) guardHistory(h fabric.History) (fabric.History, error) {
	if h == nil {
		return h, nil
	}
	gh := &guardedHistory{History: h, breakers: map[string]*breaker.Breaker{}}
	n := s.opts.Admission.HistoryBreaker
	if n < 0 {
		return gh, nil
	}
	opts := breaker.Options{Name: "history", FailureThreshold: n, ResetTimeout: historyBreakerReset, Registerer: s.reg,
		IsFailure: func(err error) bool { return errors.Is(err, fabric.ErrBackendUnavailable) }}
	jh, ok := s.backend.hist.(*fjs.History)
	if !ok {
		b, err := breaker.New(opts)
		if err != nil {
			return nil, fmt.Errorf("server: history breaker: %w", err)
		}
		gh.breakers[""] = b
		return gh, nil
	}
	gh.partition = jh.StreamOf
	for _, name := range jh.Streams() {
		opts.Name = "history:" + name
		b, err := breaker.New(opts)
		if err != nil {
			return nil, fmt.Errorf("server: history breaker: %w", err)
		}
		gh.breakers[name] = b
	}
	return gh, nil
}

// guardedHistory is a History whose appends go through the breaker of the
// topic's partition and whose reads are retried while it is unavailable.
type guardedHistory struct {
	fabric.History
	partition func(topic string) string // nil: one breaker, under ""
	breakers  map[string]*breaker.Breaker
}

func (g *guardedHistory) Append(ctx context.Context, topic string, envelope []byte, msgID string) (fabric.Position, error) {
	key := ""
	if g.partition != nil {
		key = g.partition(topic)
	}
	b := g.breakers[key]
	if b == nil {
		return g.History.Append(ctx, topic, envelope, msgID)
	}
	done, err := b.Allow()
	if err != nil {
		return fabric.Position{}, fmt.Errorf("%w: history: %w", fabric.ErrBackendUnavailable, err)
	}
	pos, err := g.History.Append(ctx, topic, envelope, msgID)
	done(err)
	return pos, err
}

// retry runs read until it succeeds, fails for another reason than the
// history being unavailable, ctx ends, or historyReadAttempts tries.
func retry[T any](ctx context.Context, read func() (T, error)) (T, error) {
	for attempt := 1; ; attempt++ {
		v, err := read()
		if err == nil || attempt == historyReadAttempts || !errors.Is(err, fabric.ErrBackendUnavailable) || ctx.Err() != nil {
			return v, err
		}
		t := time.NewTimer(historyReadPause)
		select {
		case <-ctx.Done():
			t.Stop()
			return v, err
		case <-t.C:
		}
	}
}

func (g *guardedHistory) Since(ctx context.Context, topic string, seq uint64, limit int) (fabric.Range, error) {
	return retry(ctx, func() (fabric.Range, error) { return g.History.Since(ctx, topic, seq, limit) })
}

func (g *guardedHistory) Epoch(ctx context.Context, topic string) (string, error) {
	return retry(ctx, func() (string, error) { return g.History.Epoch(ctx, topic) })
}

func (g *guardedHistory) Last(ctx context.Context, topic string) (fabric.Position, error) {
	return retry(ctx, func() (fabric.Position, error) { return g.History.Last(ctx, topic) })
}
