// Package admission is the message tier of Fabric's admission control
// (docs/admission.md): per-class rules, consulted before an RPC handler or
// a client publish runs, that refuse work with OVERLOADED ("Server is
// shedding load") while the instance is under pressure.
//
//	ctl, err := admission.New(admission.Rules{
//		"expensive-rpc":     admission.Reasons{fabric.PressureMemory, fabric.PressurePublishRate},
//		"cluster-broadcast": admission.ClusterTopPublisher{Rates: agg, Threshold: 1000},
//		"admin-only": admission.Predicate(func(ctx context.Context, class string, n *fabric.Node) (bool, error) {
//			return n.Connections() < 1000, nil
//		}),
//	}, admission.WithRegisterer(reg))
//	cfg.BeforeExecute = ctl.BeforeExecute(classOf) // RPC calls and client publishes (fabric/publish)
//
// The pressure signals themselves are the Node's (fabric.Node.Pressure);
// the handshake tier (a cap on connections, paced upgrades, 503 past
// them) is fabric.UpgradeAdmission, shared by the WebSocket and SSE
// transports.
//
// The package also holds the cluster-wide publish-rate aggregator
// (Aggregator: every instance broadcasts its top publishers on a system
// topic of the node's Broker, every instance merges them), the sharded
// bus's subscriber counts (Bus, LocalSubjects), the Prometheus wirers
// (WirePublishRateMetrics, WireClusterPublishRateMetrics) and InFlight, a
// concurrency limit usable as a Predicate. The circuit breaker used around
// backend calls is package breaker.
package admission
