package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	natsserver "github.com/nats-io/nats-server/v2/server"
)

// tenantOptions are the options of one instance of a tenant: persistence,
// presence, a cluster-wide RPC limit keyed by IP (every test client is
// 127.0.0.1, so a leak between tenants would show), the publish-rate
// aggregator.
func tenantOptions(t *testing.T, natsURL, prefix string) Options {
	o := testOptions(t)
	o.NATS = NATSOptions{URL: natsURL, SubjectPrefix: prefix}
	o.Topics = []TopicPolicy{{Pattern: "feed:*", Persistent: true}, {Pattern: "room:*", Presence: true}}
	o.Presence = PresenceOptions{Heartbeat: 200 * time.Millisecond, Expire: time.Second}
	o.RateLimit = RateLimitOptions{Points: 5, Interval: time.Minute, By: "ip"}
	o.Admission.Aggregator = AggregatorOptions{Enable: true, PublishInterval: 100 * time.Millisecond, StaleAfter: 2 * time.Second}
	return o
}

// tenant is the instances of one tenant and its name.
type tenant struct {
	name string
	srvs []*Server
}

// checkTenantIsolation runs load in two tenants sharing one NATS
// deployment and checks that neither sees anything of the other: messages
// (same topic names), history, presence, rate limits, aggregator slices,
// cluster counts.
func checkTenantIsolation(t *testing.T, a, b tenant) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	tenants := []tenant{a, b}
	for _, tn := range tenants {
		for _, s := range tn.srvs {
			s.Node().HandleRPC("t/ping", func(context.Context, *fabric.Call) (any, error) { return "pong", nil })
		}
	}
	// Subscribers of "chat" and "feed:1" on every instance; presence
	// members of room:1.
	type sub struct {
		tenant string
		c      *wsclient.Client
		got    map[string]int // tenant named in the data → count
		mu     sync.Mutex
	}
	var subs []*sub
	var members int
	for _, tn := range tenants {
		for _, s := range tn.srvs {
			c := dial(t, ctx, s, wsclient.Options{Buffer: 1 << 15})
			for _, topic := range []string{"chat", "feed:1", "room:1"} {
				if err := c.Subscribe(ctx, topic); err != nil {
					t.Fatal(err)
				}
			}
			members++
			sb := &sub{tenant: tn.name, c: c, got: map[string]int{}}
			subs = append(subs, sb)
			go func() {
				for e := range c.Events() {
					var d struct{ T string }
					if (e.Topic == "chat" || e.Topic == "feed:1") && json.Unmarshal(e.Data, &d) == nil {
						sb.mu.Lock()
						sb.got[d.T]++
						sb.mu.Unlock()
					}
				}
			}()
		}
	}
	// Load: both tenants publish to the same topic names at once, live and
	// persistent, through every instance.
	var sent [2]atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(2 * time.Second)
	for ti, tn := range tenants {
		for _, s := range tn.srvs {
			wg.Go(func() {
				for i := 0; time.Now().Before(deadline); i++ {
					topic := "chat"
					if i%2 == 1 {
						topic = "feed:1"
					}
					data := fmt.Sprintf(`{"t":%q,"n":%d}`, tn.name, i)
					if _, err := s.Node().Publish(ctx, topic, "m", json.RawMessage(data)); err != nil {
						t.Errorf("%s publish: %v", tn.name, err)
						return
					}
					// Hot topics of each tenant for the aggregator.
					_, _ = s.Node().Publish(ctx, "hot-"+tn.name, "m", json.RawMessage(data))
					sent[ti].Add(1)
					time.Sleep(2 * time.Millisecond)
				}
			})
		}
	}
	wg.Wait()
	fabrictest.WaitFor(t, 30*time.Second, "every subscriber got its tenant's messages", func() bool {
		for _, sb := range subs {
			ti := slices.IndexFunc(tenants, func(tn tenant) bool { return tn.name == sb.tenant })
			sb.mu.Lock()
			n := sb.got[sb.tenant]
			sb.mu.Unlock()
			if int64(n) < sent[ti].Load() {
				return false
			}
		}
		return true
	})
	for _, sb := range subs {
		sb.mu.Lock()
		for name, n := range sb.got {
			if name != sb.tenant {
				t.Errorf("a subscriber of %s received %d messages of %s", sb.tenant, n, name)
			}
		}
		sb.mu.Unlock()
	}
	t.Logf("load: %s sent %d, %s sent %d messages on the same topics; no subscriber saw the other tenant's",
		a.name, sent[0].Load(), b.name, sent[1].Load())

	for ti, tn := range tenants {
		other := tenants[1-ti]
		s := tn.srvs[0]
		// History: only the tenant's own messages.
		rng, err := s.Node().Since(ctx, "feed:1", 0, 10000)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range rng.Messages {
			if strings.Contains(string(m.Envelope), `"t":"`+other.name+`"`) {
				t.Fatalf("%s's history holds a message of %s: %s", tn.name, other.name, m.Envelope)
			}
		}
		// Presence: the tenant's own members only.
		fabrictest.WaitFor(t, 10*time.Second, tn.name+"'s presence", func() bool {
			list, err := s.Presence().List(ctx, "room:1")
			return err == nil && len(list) == len(tn.srvs)
		})
		// Cluster counts: the tenant's own connections only.
		n, err := s.Cluster().Connections(ctx)
		if err != nil || n != len(tn.srvs) {
			t.Errorf("%s counts %d connections (%v), want its own %d", tn.name, n, err, len(tn.srvs))
		}
		// Aggregator slices: the tenant's own instances and topics only.
		fabrictest.WaitFor(t, 10*time.Second, tn.name+"'s aggregator to see its hot topic", func() bool {
			return slices.ContainsFunc(s.agg.TopPublishers(), func(r admission.ClusterTopicRate) bool { return r.Topic == "hot-"+tn.name })
		})
		for _, r := range s.agg.TopPublishers() {
			if strings.HasSuffix(r.Topic, other.name) {
				t.Errorf("%s's aggregator ranks %s's topic %s", tn.name, other.name, r.Topic)
			}
		}
		if got := s.agg.Instances(); got > len(tn.srvs) {
			t.Errorf("%s's aggregator hears %d instances, the tenant has %d", tn.name, got, len(tn.srvs))
		}
	}
	// Rate limits: tenant a's clients (all 127.0.0.1) use up the IP's
	// points; tenant b's, same IP, still have all of theirs.
	ca := dial(t, ctx, a.srvs[0], wsclient.Options{})
	for i := range 6 {
		_, err := ca.Call(ctx, "t/ping")
		var re *wsclient.RPCError
		if i < 5 && err != nil {
			t.Fatalf("%s call %d: %v", a.name, i, err)
		}
		if i == 5 && (!errors.As(err, &re) || re.Code != "RATE_LIMITED") {
			t.Fatalf("%s call 6: %v, want RATE_LIMITED", a.name, err)
		}
	}
	cb := dial(t, ctx, b.srvs[0], wsclient.Options{})
	for i := range 5 {
		if _, err := cb.Call(ctx, "t/ping"); err != nil {
			t.Fatalf("%s call %d after %s used up the IP's points: %v", b.name, i, a.name, err)
		}
	}
	t.Logf("history, presence, cluster counts, aggregator slices and rate limits stay within each tenant")
}

// TestTenantsByPrefix: two tenants, two instances each, on one NATS
// deployment, told apart by their subject prefix only.
func TestTenantsByPrefix(t *testing.T) {
	ns := fabrictest.StartNATS(t, nil)
	url := ns.ClientURL()
	var a, b tenant
	a.name, b.name = "alpha", "beta"
	for range 2 {
		a.srvs = append(a.srvs, startServer(t, tenantOptions(t, url, "tenant_alpha")))
		b.srvs = append(b.srvs, startServer(t, tenantOptions(t, url, "tenant_beta")))
	}
	checkTenantIsolation(t, a, b)
}

// TestTenantsByAccount: two tenants with the same subject prefix, each
// connecting as a user of its own NATS account (JetStream per account):
// the accounts alone keep them apart.
func TestTenantsByAccount(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "nats.conf")
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`
listen: "127.0.0.1:-1"
jetstream { store_dir: %q }
accounts {
  ALPHA { jetstream: enabled, users: [ { user: alpha, password: a1 } ] }
  BETA  { jetstream: enabled, users: [ { user: beta,  password: b1 } ] }
}
`, filepath.Join(dir, "js"))), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fileOpts, err := natsserver.ProcessConfigFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	ns := fabrictest.StartNATS(t, func(o *natsserver.Options) {
		fileOpts.NoSigs, fileOpts.NoLog = true, true
		*o = *fileOpts
	})
	hostPort := strings.TrimPrefix(ns.ClientURL(), "nats://")
	var a, b tenant
	a.name, b.name = "alpha", "beta"
	a.srvs = append(a.srvs, startServer(t, tenantOptions(t, "nats://alpha:a1@"+hostPort, "fabric")))
	b.srvs = append(b.srvs, startServer(t, tenantOptions(t, "nats://beta:b1@"+hostPort, "fabric")))
	checkTenantIsolation(t, a, b)
}
