package pgbridge

import "github.com/prometheus/client_golang/prometheus"

// metrics are a Bridge's instruments (fabric_pg_*); the Bridge is their
// prometheus.Collector.
type metrics struct {
	received  *prometheus.CounterVec // channel
	published *prometheus.CounterVec // channel
	invalid   *prometheus.CounterVec // channel, reason
	failed    *prometheus.CounterVec // channel
	reconnect *prometheus.CounterVec // channel
	leaseHeld *prometheus.GaugeVec   // channel
	connected *prometheus.GaugeVec   // channel

	obPublished prometheus.Counter
	obDeleted   prometheus.Counter
	obInvalid   *prometheus.CounterVec // reason
	obBatches   prometheus.Counter
	obErrors    *prometheus.CounterVec // reason
	obLag       prometheus.Gauge

	all []prometheus.Collector
}

func newMetrics() *metrics {
	m := &metrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_notifications_received_total",
			Help: "Postgres notifications received by this instance, by channel.",
		}, []string{"channel"}),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_notifications_published_total",
			Help: "Postgres notifications published onto a topic, by channel.",
		}, []string{"channel"}),
		invalid: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_notifications_invalid_total",
			Help: "Postgres notifications not published because of their payload, by channel and reason (not_json, shape, topic, event, data, route, skipped).",
		}, []string{"channel", "reason"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_notifications_failed_total",
			Help: "Postgres notifications whose publish failed (the backend refused or stayed unavailable), by channel.",
		}, []string{"channel"}),
		reconnect: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_reconnects_total",
			Help: "Listening connections to Postgres lost and re-established, by channel (notify channels and the outbox's wake-up channel).",
		}, []string{"channel"}),
		leaseHeld: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fabric_pg_lease_held",
			Help: "1 while this instance holds the channel's lease (it is the channel's bridger), 0 on standby.",
		}, []string{"channel"}),
		connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fabric_pg_listening",
			Help: "1 while this instance is connected and listening on the channel.",
		}, []string{"channel"}),
		obPublished: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_pg_outbox_rows_published_total",
			Help: "Outbox rows published by this instance (a row published again after a failed delete counts again).",
		}),
		obDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_pg_outbox_rows_deleted_total",
			Help: "Outbox rows deleted by this instance after their publish (or because they can never be published).",
		}),
		obInvalid: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_outbox_rows_invalid_total",
			Help: "Outbox rows deleted unpublished because they can never be published, by reason (topic, event).",
		}, []string{"reason"}),
		obBatches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_pg_outbox_batches_total",
			Help: "Outbox batches (a partition's rows read, published and deleted in one transaction) committed by this instance.",
		}),
		obErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fabric_pg_outbox_errors_total",
			Help: "Outbox batches that failed, by reason (postgres, publish, setup).",
		}, []string{"reason"}),
		obLag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fabric_pg_outbox_lag_seconds",
			Help: "Age of the oldest row of the last outbox batch this instance read, when it read it (0 after an empty read).",
		}),
	}
	m.all = []prometheus.Collector{m.received, m.published, m.invalid, m.failed, m.reconnect, m.leaseHeld,
		m.connected, m.obPublished, m.obDeleted, m.obInvalid, m.obBatches, m.obErrors, m.obLag}
	return m
}
