package server

import (
	"os"
	"strings"
	"testing"
)

// TestMetricsDocumented: every metric a running server registers (NATS and
// memory backends, presence, rate limit, admission) is in docs/metrics.md.
func TestMetricsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, backend := range []string{BackendNATS, BackendMemory} {
		o := testOptions(t)
		o.Backend = backend
		o.Topics = []TopicPolicy{{Pattern: "room:*", Presence: true, Persistent: true}}
		o.RateLimit.Points = 10
		o.Admission.Aggregator.Enable = true
		s := startServer(t, o)
		mfs, err := s.gatherer.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			name := mf.GetName()
			if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") || strings.HasPrefix(name, "promhttp_") {
				continue
			}
			if !strings.Contains(string(doc), "`"+name+"`") {
				t.Errorf("%s (backend %s) is not in docs/metrics.md", name, backend)
			}
		}
	}
}
