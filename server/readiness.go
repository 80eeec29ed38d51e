package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/embed"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/nats-io/nats.go/jetstream"
)

// Readiness
//
// /readyz answers 503 until the instance can serve, and says what it waits
// for, in this order:
//
//   - "starting": New is still building the server (it waits for JetStream
//     to create its buckets); the cluster state below is shown meanwhile;
//   - "peers (k of n)": a clustered instance whose JetStream has no meta
//     leader yet and fewer members than its cluster has (n is the cluster
//     size its routes give) – the first instance of a cluster says "peers
//     (1 of 3)" until a second one is up;
//   - "a JetStream meta leader": enough members, the election is running;
//   - the backend: NATS connected, JetStream answering;
//   - "stream leaders (k of m placed)": every stream and bucket of this
//     prefix has a leader (the history's partition streams are created
//     here when there are persistent topics and the start could not);
//   - "replicas to catch up (k of m current)": a restarted instance's
//     replicas have caught up with their leaders.
//
// The body is {"status": "ready" | "starting" | "waiting for <what>",
// "waiting_for": what, "error": the backend's error, "cluster": {"peers":
// "2 of 3", "meta_leader", "gateways": "1 of 1", "leafnodes", "streams": "19
// of 19 placed", "replicas_here": "19 of 19 current", "degraded": ...}}.
//
// The cluster conditions gate the start only: once an instance has been
// ready, losing a member, a meta leader or a stream leader leaves it ready
// (every instance of the cluster would drop out of the load balancer at
// once otherwise) and /readyz reports it in "cluster"; the backend check
// (NATS connected, JetStream answering) and draining gate it always.

// bootState is what the readiness check and the early listeners can see
// while New runs (the backend is not theirs to read until it has built).
type bootState struct {
	serveOnce sync.Once
	built     atomic.Bool // New has returned the server
	open      atomic.Bool // Run has begun: every route is served
	openOnce  sync.Once
	opened    chan struct{} // closed when Run begins (see openedCh)
	latched   atomic.Bool   // the start conditions have all held once
	embedded  atomic.Pointer[embed.Server]

	mu     sync.Mutex
	at     time.Time
	report readyReport
}

// readyReport is the outcome of one readiness check.
type readyReport struct {
	waitingFor string         // "" when ready
	err        string         // the backend's error, if that is what is waited for
	cluster    map[string]any // what the instance knows of its cluster
}

func (r readyReport) ready() bool { return r.waitingFor == "" }

func (r *readyReport) set(k string, v any) {
	if r.cluster == nil {
		r.cluster = map[string]any{}
	}
	r.cluster[k] = v
}

// serve starts the listeners' accept loops, once: New does it as soon as
// they are bound, so that the probes answer while the start waits for the
// cluster (see listener.ServeHTTP for what is served before Run).
func (s *Server) serve() {
	s.boot.serveOnce.Do(func() {
		s.serveWG.Add(len(s.listeners))
		for _, l := range s.listeners {
			go func() {
				defer s.serveWG.Done()
				if err := l.srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
					s.serveErr <- fmt.Errorf("server: serve %s: %w", l.ln.Addr(), err)
				}
			}()
		}
	})
}

// openedCh is closed when Run begins.
func (b *bootState) openedCh() chan struct{} {
	b.openOnce.Do(func() { b.opened = make(chan struct{}) })
	return b.opened
}

// serveBeforeRun answers a request that arrives before Run: /healthz says
// the process lives, /readyz what the start waits for; any other request
// waits for Run (as it would in the listen backlog of a server that does
// not serve yet), and gets 503 with Retry-After if the server stops first.
func (l *listener) serveBeforeRun(w http.ResponseWriter, r *http.Request) {
	s := l.s
	switch r.URL.Path {
	case "/healthz":
		writeJSON(w, http.StatusOK, map[string]any{"status": "starting", "instance": s.bootName()})
		return
	case "/readyz":
		s.readyz(w, r)
		return
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-s.boot.openedCh():
			l.ServeHTTP(w, r)
			return
		case <-r.Context().Done(): // Close cut the connection
			return
		case <-tick.C:
			if s.draining.Load() { // Shutdown before Run
				w.Header().Set("Retry-After", "1")
				writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "server stopped before it served"})
				return
			}
		}
	}
}

func (s *Server) bootName() string {
	if ns := s.boot.embedded.Load(); ns != nil {
		return ns.Name()
	}
	if s.boot.built.Load() {
		return s.Name()
	}
	return ""
}

// readiness returns the readiness report, computed at most once a second.
func (s *Server) readiness(ctx context.Context) readyReport {
	b := &s.boot
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.at.IsZero() && time.Since(b.at) < time.Second {
		return b.report
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	b.report = s.checkReadiness(cctx)
	b.at = time.Now()
	return b.report
}

// invalidateReadiness drops the cached report (the next check recomputes).
func (s *Server) invalidateReadiness() {
	s.boot.mu.Lock()
	s.boot.at = time.Time{}
	s.boot.mu.Unlock()
}

// natsStatus is the cluster state of the NATS server this instance runs
// or, in a worker process, its primary's.
func (s *Server) natsStatus() (embed.Status, bool) {
	if ns := s.boot.embedded.Load(); ns != nil {
		return ns.Status(), true
	}
	if f := s.opts.NATSStatus; f != nil {
		return f()
	}
	return embed.Status{}, false
}

// checkReadiness runs the checks described at the top of this file.
func (s *Server) checkReadiness(ctx context.Context) readyReport {
	r := readyReport{}
	st, haveStatus := s.natsStatus()
	size := s.opts.clusterSize()
	if haveStatus && st.Clustered {
		r.set("peers", fmt.Sprintf("%d of %d", st.Peers+1, max(size, st.Peers+1)))
		r.set("meta_leader", st.MetaLeader)
		if st.GatewaysConfigured > 0 || st.Gateways > 0 {
			r.set("gateways", fmt.Sprintf("%d of %d", st.Gateways, max(st.GatewaysConfigured, st.Gateways)))
		}
	}
	if haveStatus && st.LeafNodes > 0 {
		r.set("leafnodes", st.LeafNodes)
	}
	// A standalone embedded server's streams are always placed.
	checkStreams := !haveStatus || st.Clustered
	clusterWait := func() string {
		if !haveStatus {
			return ""
		}
		if !st.JetStream {
			return "JetStream"
		}
		if st.Clustered && st.MetaLeader == "" {
			if st.Peers+1 < size {
				return fmt.Sprintf("peers (%d of %d)", st.Peers+1, size)
			}
			return "a JetStream meta leader"
		}
		return ""
	}
	if !s.boot.built.Load() {
		r.waitingFor = "starting"
		if w := clusterWait(); w != "" {
			r.waitingFor = w
		}
		return r
	}
	if err := s.backend.ready(ctx); err != nil {
		r.waitingFor, r.err = "the backend", err.Error()
		if w := clusterWait(); w != "" && !s.boot.latched.Load() {
			r.waitingFor = w
		}
		return r
	}
	if s.boot.latched.Load() {
		if w := clusterWait(); w != "" {
			r.set("degraded", "waiting for "+w)
		}
		if checkStreams {
			r = r.withStreams(s.streamsPlaced(ctx), true)
		}
		return r
	}
	if w := clusterWait(); w != "" {
		r.waitingFor = w
		return r
	}
	if checkStreams {
		s.ensureHistoryStreams(ctx)
		if r = r.withStreams(s.streamsPlaced(ctx), false); !r.ready() {
			return r
		}
	}
	if !s.boot.open.Load() {
		r.waitingFor = "starting"
		return r
	}
	s.boot.latched.Store(true)
	return r
}

// streamsReport is the state of this prefix's streams and buckets.
type streamsReport struct {
	checked       bool
	total, placed int
	current       int // of those with a replica here, how many are current
	replicasHere  int
	err           error
	unplaced      []string
}

// withStreams adds the streams' state to r; unless info, an unplaced or
// lagging stream is what r waits for.
func (r readyReport) withStreams(sr streamsReport, info bool) readyReport {
	if !sr.checked {
		return r
	}
	if sr.err != nil {
		r.set("streams", "unknown: "+sr.err.Error())
		if !info {
			r.waitingFor = "the stream list"
		}
		return r
	}
	r.set("streams", fmt.Sprintf("%d of %d placed", sr.placed, sr.total))
	if sr.replicasHere > 0 {
		r.set("replicas_here", fmt.Sprintf("%d of %d current", sr.current, sr.replicasHere))
	}
	if info {
		if sr.placed < sr.total {
			r.set("degraded", "streams without a leader: "+strings.Join(sr.unplaced, ", "))
		}
		return r
	}
	switch {
	case sr.placed < sr.total:
		r.waitingFor = fmt.Sprintf("stream leaders (%d of %d placed)", sr.placed, sr.total)
	case sr.current < sr.replicasHere:
		r.waitingFor = fmt.Sprintf("replicas to catch up (%d of %d current)", sr.current, sr.replicasHere)
	}
	return r
}

// streamsPlaced lists this prefix's streams (history partitions, the KV
// buckets of presence, rate limits and leases, the rate-limit counters)
// with one request and checks each has a leader and, when this server
// holds a replica, that it is current.
func (s *Server) streamsPlaced(ctx context.Context) streamsReport {
	b := s.backend
	if b == nil || b.js == nil {
		return streamsReport{}
	}
	sr := streamsReport{checked: true}
	self := ""
	if b.ns != nil {
		self = b.ns.Name()
	}
	p := streamNameToken(s.opts.NATS.SubjectPrefix) + "_"
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	l := b.js.ListStreams(ctx)
	for info := range l.Info() {
		name := info.Config.Name
		if !strings.HasPrefix(name, p) && !strings.HasPrefix(name, "KV_"+p) {
			continue
		}
		sr.total++
		c := info.Cluster
		if c == nil || c.Leader != "" {
			sr.placed++
		} else {
			sr.unplaced = append(sr.unplaced, name)
		}
		if c == nil || self == "" {
			continue
		}
		if c.Leader == self {
			sr.replicasHere++
			sr.current++
			continue
		}
		for _, p := range c.Replicas {
			if p.Name == self {
				sr.replicasHere++
				if p.Current && !p.Offline && c.Leader != "" {
					sr.current++
				}
			}
		}
	}
	sr.err = l.Err()
	return sr
}

// ensureHistoryStreams creates the history's partition streams that do not
// exist yet when there are persistent topics: NewHistory tries once, and a
// cluster still forming then leaves them to the first publishes; the start
// creates them here instead, so that "streams placed" covers them.
func (s *Server) ensureHistoryStreams(ctx context.Context) {
	b := s.backend
	h, ok := b.hist.(*fjs.History)
	if !ok || b.js == nil || s.policies.predicate(func(p *TopicPolicy) bool { return p.Persistent }) == nil {
		return
	}
	var wg sync.WaitGroup
	for i, name := range h.Streams() {
		if _, err := b.js.Stream(ctx, name); err == nil || !errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		wg.Go(func() {
			if _, err := b.js.CreateOrUpdateStream(ctx, h.StreamConfig(i)); err != nil {
				s.log.Debug("history stream not created yet", "stream", name, "err", err)
			}
		})
	}
	wg.Wait()
}

// streamNameToken is the jetstream package's mapping of a subject prefix to
// the start of its stream and bucket names.
func streamNameToken(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// readyBody is the JSON of /readyz.
func (r readyReport) body() map[string]any {
	out := map[string]any{}
	switch {
	case r.ready():
		out["status"] = "ready"
	case r.waitingFor == "starting":
		out["status"] = "starting"
	default:
		out["status"] = "waiting for " + r.waitingFor
		out["waiting_for"] = r.waitingFor
	}
	if r.err != "" {
		out["error"] = r.err
	}
	if len(r.cluster) > 0 {
		out["cluster"] = r.cluster
	}
	return out
}
