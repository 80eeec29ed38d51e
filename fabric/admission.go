package fabric

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// This file is the handshake tier of admission control (docs/admission.md):
// a cap on the node's connections and a budget of upgrades per tick,
// consulted by every transport (the WebSocket edge, SSE) before it does any
// work for a request. Past either, the request gets a fast 503 with
// Retry-After. The message tier (per-class rules on pressure signals) is
// package admission.

// Defaults of UpgradeAdmissionOptions.
const (
	// DefaultUpgradeTick is the tick the upgrade budget is counted in.
	DefaultUpgradeTick = 10 * time.Millisecond
	// DefaultUpgradeRetryAfter is the Retry-After of a refused upgrade.
	DefaultUpgradeRetryAfter = time.Second
)

// Reasons an upgrade is refused: the reason label of
// fabric_upgrades_rejected_total.
const (
	UpgradeRejectMaxConcurrent = "max_concurrent"
	UpgradeRejectBudget        = "budget"
	UpgradeRejectPerIP         = "per_ip"
)

// UpgradeAdmissionOptions configures an UpgradeAdmission. The zero value
// admits everything.
type UpgradeAdmissionOptions struct {
	// MaxConcurrent caps the node's connections, every transport
	// together, counting upgrades under way (0: no cap). An upgrade that
	// would pass it is refused.
	MaxConcurrent int
	// PerTickBudget is how many upgrades are admitted per Tick (0: no
	// pacing); further ones in the same tick are refused.
	PerTickBudget int
	// Tick is the window PerTickBudget counts in (default 10ms): ticks are
	// consecutive windows of this length from the admission's creation, on
	// the monotonic clock, as a time.Ticker of this interval would mark
	// them, with no goroutine.
	Tick time.Duration
	// RetryAfter is sent, rounded up to whole seconds (at least 1), with
	// every refusal (default 1s).
	RetryAfter time.Duration
	// MaxPerIP caps the connections from one client address (0: no cap),
	// counting upgrades under way; the address is the one the node's
	// proxy policy finds (Config.Proxies). Loopback clients that did not
	// come through a proxy are not counted. Past it a request gets 429
	// with Retry-After.
	MaxPerIP int
}

// UpgradeAdmission decides, before any upgrade work, whether a transport
// takes a new connection. One is shared by every transport of a Node (the
// cap counts the node's connections); a nil *UpgradeAdmission admits
// everything.
type UpgradeAdmission struct {
	node  *Node
	opts  UpgradeAdmissionOptions
	start time.Time
	retry string // Retry-After value

	// window packs the current tick's index (high 40 bits) and the
	// upgrades admitted in it (low 24 bits).
	window   atomic.Uint64
	inFlight atomic.Int64 // admitted upgrades not yet released

	// Connections and upgrades under way per client address, when
	// MaxPerIP is set: an entry lives while its count is positive, so
	// the map holds at most the node's connections plus its upgrades.
	ipMu    sync.Mutex
	perIP   map[netip.Addr]*ipCount
	ipAddrs atomic.Int64 // len(perIP), for the gauge

	admitted                             prometheus.Counter
	rejectedMax, rejectedBud, rejectedIP prometheus.Counter
}

const (
	windowCountBits = 24
	windowCountMask = 1<<windowCountBits - 1
)

// NewUpgradeAdmission returns the handshake admission of node's transports.
// Its metrics (fabric_upgrades_admitted_total,
// fabric_upgrades_rejected_total{reason}, fabric_upgrades_in_flight) go to
// the node's Registerer: make one per Node.
func NewUpgradeAdmission(node *Node, opts UpgradeAdmissionOptions) (*UpgradeAdmission, error) {
	if node == nil {
		return nil, errors.New("fabric: NewUpgradeAdmission: nil node")
	}
	if opts.MaxConcurrent < 0 || opts.PerTickBudget < 0 || opts.Tick < 0 || opts.RetryAfter < 0 {
		return nil, errors.New("fabric: UpgradeAdmissionOptions: negative values are not allowed")
	}
	if opts.PerTickBudget > windowCountMask {
		return nil, fmt.Errorf("fabric: UpgradeAdmissionOptions.PerTickBudget %d: at most %d", opts.PerTickBudget, windowCountMask)
	}
	if opts.Tick == 0 {
		opts.Tick = DefaultUpgradeTick
	}
	if opts.RetryAfter == 0 {
		opts.RetryAfter = DefaultUpgradeRetryAfter
	}
	a := &UpgradeAdmission{
		node:  node,
		opts:  opts,
		start: time.Now(),
		retry: strconv.FormatInt(max(1, int64(math.Ceil(opts.RetryAfter.Seconds()))), 10),
		admitted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fabric_upgrades_admitted_total", Help: "Connection requests (WebSocket upgrades, SSE streams) the handshake admission let through.",
		}),
	}
	rejected := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fabric_upgrades_rejected_total", Help: "Connection requests refused with 503 by the handshake admission, by reason (max_concurrent, budget).",
	}, []string{"reason"})
	a.rejectedMax = rejected.WithLabelValues(UpgradeRejectMaxConcurrent)
	a.rejectedBud = rejected.WithLabelValues(UpgradeRejectBudget)
	a.rejectedIP = rejected.WithLabelValues(UpgradeRejectPerIP)
	if reg := node.cfg.Registerer; reg != nil {
		for _, c := range []prometheus.Collector{a.admitted, rejected, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_upgrades_in_flight", Help: "Admitted connection requests not yet attached to the node.",
		}, func() float64 { return float64(a.inFlight.Load()) }), prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fabric_client_addresses", Help: "Client addresses with connections or upgrades under way, counted when a per-address cap is set (0 otherwise).",
		}, func() float64 { return float64(a.ipAddrs.Load()) })} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("fabric: registering the upgrade admission metrics: %w", err)
			}
		}
	}
	if opts.MaxPerIP > 0 {
		a.perIP = map[netip.Addr]*ipCount{}
		node.Observe(ipObserver{a})
	}
	return a, nil
}

// Options returns the options in effect, defaults filled in.
func (a *UpgradeAdmission) Options() UpgradeAdmissionOptions { return a.opts }

// Admit decides on one connection request r. Refused, it has written the
// returned status (503, or 429 past MaxPerIP) with Retry-After to w and
// the transport must do nothing more. Admitted (status 0), the transport
// calls release
// once the connection is attached to the node (Node.Connect) or has
// failed; release is idempotent. A nil a admits everything.
func (a *UpgradeAdmission) Admit(w http.ResponseWriter, r *http.Request) (release func(), status int) {
	if a == nil {
		return func() {}, 0
	}
	if a.opts.MaxConcurrent > 0 {
		// Counted first, then checked: concurrent requests see each
		// other, so the cap is never passed (an upgrade that has just
		// attached may briefly count twice, which refuses early, never
		// late).
		if n := a.inFlight.Add(1); int64(a.node.Connections())+n > int64(a.opts.MaxConcurrent) {
			a.inFlight.Add(-1)
			a.rejectedMax.Inc()
			return nil, a.refuse(w, http.StatusServiceUnavailable, "server at its connection limit")
		}
	} else {
		a.inFlight.Add(1)
	}
	if a.opts.PerTickBudget > 0 && !a.takeBudget() {
		a.inFlight.Add(-1)
		a.rejectedBud.Inc()
		return nil, a.refuse(w, http.StatusServiceUnavailable, "too many connection attempts, retry shortly")
	}
	var ip netip.Addr
	if a.perIP != nil {
		addr, proxied := a.node.cfg.Proxies.ClientAddr(r)
		if addr.IsValid() && (proxied || !addr.IsLoopback()) {
			if !a.takeIP(addr) {
				a.inFlight.Add(-1)
				a.rejectedIP.Inc()
				return nil, a.refuse(w, http.StatusTooManyRequests, "too many connections from your address")
			}
			ip = addr
		}
	}
	a.admitted.Inc()
	var done atomic.Bool
	return func() {
		if done.CompareAndSwap(false, true) {
			a.inFlight.Add(-1)
			if ip.IsValid() {
				a.addIP(ip, 0, -1)
			}
		}
	}, 0
}

// ipCount is one client address's connections and upgrades under way.
type ipCount struct{ conns, upgrades int }

// takeIP counts an upgrade from addr unless addr is at MaxPerIP (an
// upgrade that has just attached counts twice until released: early, never
// late).
func (a *UpgradeAdmission) takeIP(addr netip.Addr) bool {
	a.ipMu.Lock()
	defer a.ipMu.Unlock()
	c := a.perIP[addr]
	if c != nil && c.conns+c.upgrades >= a.opts.MaxPerIP {
		return false
	}
	if c == nil {
		c = &ipCount{}
		a.perIP[addr] = c
		a.ipAddrs.Add(1)
	}
	c.upgrades++
	return true
}

// addIP adds to addr's counts, dropping the entry at zero.
func (a *UpgradeAdmission) addIP(addr netip.Addr, conns, upgrades int) {
	a.ipMu.Lock()
	defer a.ipMu.Unlock()
	c := a.perIP[addr]
	if c == nil {
		if conns <= 0 && upgrades <= 0 {
			return
		}
		c = &ipCount{}
		a.perIP[addr] = c
		a.ipAddrs.Add(1)
	}
	c.conns += conns
	c.upgrades += upgrades
	if c.conns <= 0 && c.upgrades <= 0 {
		delete(a.perIP, addr)
		a.ipAddrs.Add(-1)
	}
}

// ipObserver counts the node's connections per client address (the
// address the transport attached them under: Node.ClientAddr).
type ipObserver struct{ a *UpgradeAdmission }

func (o ipObserver) Connected(c *Client) {
	if ip, ok := countedAddr(c.RemoteAddr()); ok {
		o.a.addIP(ip, 1, 0)
	}
}

func (o ipObserver) Disconnected(c *Client) {
	if ip, ok := countedAddr(c.RemoteAddr()); ok {
		o.a.addIP(ip, -1, 0)
	}
}

func (ipObserver) Subscribed(*Client, string)   {}
func (ipObserver) Unsubscribed(*Client, string) {}

// countedAddr is the address a connection counts under. A loopback one is
// not counted: Admit does not count loopback clients that came directly,
// and one that came through a proxy is attached under the proxy's
// address only when the proxy is not trusted.
func countedAddr(remote string) (netip.Addr, bool) {
	ip := peerAddr(remote)
	return ip, ip.IsValid() && !ip.IsLoopback()
}

// takeBudget takes one upgrade from the current tick's budget.
func (a *UpgradeAdmission) takeBudget() bool {
	tick := uint64(time.Since(a.start) / a.opts.Tick)
	budget := uint64(a.opts.PerTickBudget)
	for {
		old := a.window.Load()
		next := tick<<windowCountBits | 1
		// A tick another request has already begun (w > tick: this one
		// read the clock just before it) is this request's tick too.
		if w := old >> windowCountBits; w >= tick {
			if old&windowCountMask >= budget {
				return false
			}
			next = old + 1
		}
		if a.window.CompareAndSwap(old, next) {
			return true
		}
	}
}

func (a *UpgradeAdmission) refuse(w http.ResponseWriter, status int, msg string) int {
	h := w.Header()
	h.Set("Retry-After", a.retry)
	h.Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg + "\n"))
	return status
}
