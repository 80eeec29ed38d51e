package fabric

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Prometheus instruments of a Node and its edges. Counters
// on the hot path are added to once per message or per write, never once
// per subscriber.
type Metrics struct {
	// MessagesIn counts frames received from clients, by kind
	// (subscribe, unsubscribe, replay, rpc, message).
	MessagesIn *prometheus.CounterVec
	// BytesIn counts payload bytes received from clients.
	BytesIn prometheus.Counter
	// MessagesOut counts messages queued to connections.
	MessagesOut prometheus.Counter
	// BytesOut counts bytes written to connections.
	BytesOut prometheus.Counter
	// Resumes counts replays and subscribes with since, by where their
	// messages came from (cache: this instance's recent messages; store:
	// the history).
	Resumes *prometheus.CounterVec
	// ResumesRefused counts resumes refused by a connection's limits, by
	// reason (rate, queue).
	ResumesRefused *prometheus.CounterVec
	// ResumeRereads counts history reads repeated because a resume held more
	// live messages than Config.ResumeHold.
	ResumeRereads prometheus.Counter
	// Writes counts socket writes to connections; BytesOut/Writes is the
	// average batch, MessagesOut/Writes the frames per write.
	Writes prometheus.Counter
	// Dropped counts messages not delivered to a connection, by reason
	// (backpressure, closed).
	Dropped *prometheus.CounterVec
	// InvalidFrames counts malformed or refused client frames, by reason.
	InvalidFrames *prometheus.CounterVec
	// Duplicates counts stored messages the backend delivered again and the
	// node dropped before any subscriber (see topicState.Receive).
	Duplicates prometheus.Counter
	// Gaps counts stored messages the live feed skipped, by what the node
	// did: repaired from the store, partial, failed, skipped (rate bound).
	Gaps *prometheus.CounterVec
	// Published counts publishes made on this instance.
	Published prometheus.Counter
	// Handshakes counts WebSocket upgrade attempts, by HTTP status.
	Handshakes *prometheus.CounterVec

	rpcCalls *prometheus.CounterVec

	// LimitsExceeded counts requests past a connection's Limits, by limit
	// (topics, presence, rpc_rate, inbound_rate, denials).
	LimitsExceeded *prometheus.CounterVec
	// Denials counts refused client requests, by kind (subscribe, replay,
	// publish, rpc, refresh) and reason code.
	Denials *prometheus.CounterVec

	kindSubscribe, kindUnsubscribe, kindReplay, kindRPC, kindMessage, kindRefresh prometheus.Counter
	tokensExpired                                                                 prometheus.Counter
}

func newMetrics(n *Node, reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		MessagesIn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_messages_in_total", Help: "Frames received from clients, by kind.",
		}, []string{"kind"}),
		BytesIn: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_bytes_in_total", Help: "Payload bytes received from clients.",
		}),
		MessagesOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_messages_out_total", Help: "Messages queued to client connections.",
		}),
		BytesOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_bytes_out_total", Help: "Bytes written to client connections.",
		}),
		Resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_resumes_total", Help: "Resumes (replay, subscribe with since) by source of their messages: cache or store.",
		}, []string{"source"}),
		ResumesRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_resumes_refused_total", Help: "Resumes refused by a connection's resume limits, by reason (rate, queue).",
		}, []string{"reason"}),
		ResumeRereads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_resume_rereads_total", Help: "History reads repeated because a resume held more live messages than its hold allows.",
		}),
		Writes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_socket_writes_total", Help: "Socket writes (writev calls) to client connections.",
		}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_messages_dropped_total", Help: "Messages not delivered to a connection, by reason.",
		}, []string{"reason"}),
		InvalidFrames: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_frames_invalid_total", Help: "Malformed or refused client frames, by reason.",
		}, []string{"reason"}),
		Duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_duplicates_dropped_total", Help: "Stored messages the backend delivered a second time (a stream leader change can republish one), dropped before any subscriber.",
		}),
		Gaps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_live_gaps_total", Help: "Gaps in a persistent topic's live feed (a stored message whose predecessor never arrived), by outcome: repaired from the store, partial, failed, skipped.",
		}, []string{"outcome"}),
		Published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_publishes_total", Help: "Publishes made on this instance.",
		}),
		Handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_handshakes_total", Help: "WebSocket upgrade attempts, by HTTP status.",
		}, []string{"status"}),
		LimitsExceeded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_limits_exceeded_total", Help: "Client requests past a connection's limits, by limit (topics, presence, rpc_rate, inbound_rate, denials).",
		}, []string{"limit"}),
		Denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_denials_total", Help: "Client requests refused, by kind (subscribe, replay, publish, rpc, refresh) and reason code.",
		}, []string{"kind", "reason"}),
		tokensExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_tokens_expired_total", Help: "Connections closed because their token expired without a refresh.",
		}),
		rpcCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_rpc_calls_total", Help: "RPC calls answered, by result code.",
		}, []string{"code"}),
	}
	in := m.MessagesIn
	m.kindSubscribe, m.kindUnsubscribe = in.WithLabelValues("subscribe"), in.WithLabelValues("unsubscribe")
	m.kindReplay, m.kindRPC, m.kindMessage = in.WithLabelValues("replay"), in.WithLabelValues("rpc"), in.WithLabelValues("message")
	m.kindRefresh = in.WithLabelValues("refresh")
	if reg == nil {
		return m
	}
	reg.MustRegister(m.MessagesIn, m.BytesIn, m.MessagesOut, m.BytesOut, m.Writes, m.Resumes, m.ResumesRefused, m.ResumeRereads, m.Dropped,
		m.InvalidFrames, m.Duplicates, m.Gaps, m.Published, m.Handshakes, m.rpcCalls, m.Denials, m.LimitsExceeded, m.tokensExpired,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_connections", Help: "Open client connections on this instance.",
		}, func() float64 { return float64(n.Connections()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_subscriptions", Help: "Client subscriptions (connection, topic pairs) on this instance.",
		}, func() float64 { return float64(n.hub.subs.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_history_reads_in_flight", Help: "History reads in flight on this instance (bounded by ResumeLimits.MaxConcurrentReads).",
		}, func() float64 { return float64(len(n.reads)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_topics", Help: "Topics with at least one subscriber on this instance.",
		}, func() float64 { return float64(n.hub.topics.Load()) }),
	)
	// A backend's own instruments (drops by reason, reconnects) come with
	// it: any part of it that is a prometheus.Collector is registered.
	for _, part := range []any{n.broker, n.cfg.History} {
		if c, ok := part.(prometheus.Collector); ok {
			// A backend shared by several Nodes of one registry registers once.
			var are prometheus.AlreadyRegisteredError
			if err := reg.Register(c); err != nil && !errors.As(err, &are) {
				panic(fmt.Sprintf("fabric: registering the backend's metrics: %v", err))
			}
		}
	}
	return m
}
