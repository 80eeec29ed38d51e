package server

import (
	"context"
	"fmt"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/breaker"
	"github.com/fabricrt/fabric/fabric"
)

// admission builds the aggregator (when enabled) and the message-tier
// classes, and returns the RPC gate: admission first (a refusal costs no
// backend round trip), then next (the rate limit and the application's).
func (s *Server) admission(next func(context.Context, *fabric.Call) error) (func(context.Context, *fabric.Call) error, error) {
	o := s.opts.Admission
	if a := o.Aggregator; a.Enable {
		brk, err := breaker.New(breaker.Options{Name: "pressure_rates", Registerer: s.reg})
		if err != nil {
			return nil, fmt.Errorf("server: aggregator breaker: %w", err)
		}
		ao := admission.AggregatorOptions{Channel: a.Channel, PublishInterval: a.PublishInterval, StaleAfter: a.StaleAfter,
			TopN: a.TopN, Breaker: brk, Registerer: s.reg, Logger: s.log}
		if a.SubscriberCounts {
			ao.Subjects = func() []admission.SubjectCount { return admission.LocalSubjects(s.node) }
		}
		if s.agg, err = admission.NewAggregator(ao); err != nil {
			return nil, fmt.Errorf("server: aggregator: %w", err)
		}
	}
	if len(o.Classes) == 0 {
		return next, nil
	}
	var rates admission.RateSource
	if s.agg != nil {
		rates = s.agg
	}
	rules, classify, err := admission.Configure(o.Classes, rates)
	if err != nil {
		return nil, fmt.Errorf("server: admission: %w", err)
	}
	ctl, err := admission.New(rules, admission.WithRegisterer(s.reg))
	if err != nil {
		return nil, fmt.Errorf("server: admission: %w", err)
	}
	admit := ctl.BeforeExecute(classify)
	return func(ctx context.Context, call *fabric.Call) error {
		if err := admit(ctx, call); err != nil || next == nil {
			return err
		}
		return next(ctx, call)
	}, nil
}

// activateAggregator starts the aggregator on the node and wires the
// per-instance publish-rate metrics (and the cluster ones with it).
func (s *Server) activateAggregator() error {
	if err := admission.WirePublishRateMetrics(s.node, s.reg, admission.RateMetricsOptions{}); err != nil {
		return fmt.Errorf("server: publish-rate metrics: %w", err)
	}
	if s.agg == nil {
		return nil
	}
	if err := s.agg.Activate(s.node); err != nil {
		return fmt.Errorf("server: aggregator: %w", err)
	}
	if err := admission.WireClusterPublishRateMetrics(s.agg, s.reg, admission.RateMetricsOptions{}); err != nil {
		return fmt.Errorf("server: cluster publish-rate metrics: %w", err)
	}
	return nil
}
