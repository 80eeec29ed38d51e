package pgbridge

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/jackc/pgx/v5"
)

// This file is the NOTIFY half: per channel, a lease loop elects the one
// instance that listens; the holder keeps a dedicated connection LISTENing
// and publishes each notification; it refreshes the lease every LeaseTTL/3
// and stops listening the moment a refresh fails or is refused, so two
// instances never publish the same notification.

var (
	errLeaseExpired = errors.New("lease expired before it could be refreshed")
	errGaveUp       = errors.New("could not reach Postgres; lease given up for another instance")
)

// leaseGuard tracks how long the holder may still act on its lease: until
// the start of its last successful Acquire plus the ttl (the store counts
// the ttl from later than that), less a margin, on the monotonic clock.
type leaseGuard struct {
	base  time.Time
	until atomic.Int64 // ns since base
	lost  atomic.Bool  // a refresh was refused or failed
}

func newLeaseGuard(acquiredAt time.Time, ttl time.Duration) *leaseGuard {
	g := &leaseGuard{base: acquiredAt}
	g.extend(acquiredAt, ttl)
	return g
}

func (g *leaseGuard) extend(at time.Time, ttl time.Duration) {
	g.until.Store(int64(at.Sub(g.base) + ttl - ttl/10))
}

func (g *leaseGuard) valid() bool {
	return !g.lost.Load() && int64(time.Since(g.base)) < g.until.Load()
}

// runChannel is channel ch's lease loop: on standby it tries to take the
// lease every LeaseTTL/3; holding it, it listens (lead) until the lease is
// lost or the bridge closes.
func (b *Bridge) runChannel(ch string, st *state) {
	name := b.leaseP + ch
	ttl := b.opts.LeaseTTL
	var lastErr string
	for b.ctx.Err() == nil {
		start := time.Now()
		actx, cancel := context.WithTimeout(b.ctx, ttl/3)
		ok, err := b.leases.Acquire(actx, name, b.holder, ttl)
		cancel()
		wait := jitter(ttl / 3)
		switch {
		case b.ctx.Err() != nil:
			return
		case err != nil:
			st.set(fmt.Errorf("lease store: %w", err))
			if msg := err.Error(); msg != lastErr {
				b.log.Warn("channel lease unavailable", "channel", ch, "err", err)
				lastErr = msg
			}
		case !ok:
			st.set(nil) // standby: another instance bridges the channel
			lastErr = ""
		default:
			lastErr = ""
			b.log.Info("bridging channel", "channel", ch, "holder", b.holder)
			if b.lead(ch, st, name, start) {
				wait = ttl // gave the lease up: let another instance try first
			}
		}
		if !sleep(b.ctx, wait) {
			return
		}
	}
}

// lead listens on ch while this instance holds its lease; it returns when
// the lease is lost, the bridge closes, or Postgres stayed out of reach for
// MaxDisconnected (gaveUp), and releases the lease unless it was lost.
func (b *Bridge) lead(ch string, st *state, name string, acquiredAt time.Time) (gaveUp bool) {
	ttl := b.opts.LeaseTTL
	g := newLeaseGuard(acquiredAt, ttl)
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	b.m.leaseHeld.WithLabelValues(ch).Set(1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer cancel() // a lost lease stops the listener at once
		b.refresh(ctx, ch, name, g)
	}()
	err := b.listen(ctx, ch, st, g)
	cancel()
	wg.Wait()
	b.m.leaseHeld.WithLabelValues(ch).Set(0)
	if b.killed.Load() || g.lost.Load() {
		return false
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer rcancel()
	if rerr := b.leases.Release(rctx, name, b.holder); rerr != nil {
		b.log.Warn("channel lease not released; it expires by itself", "channel", ch, "err", rerr)
	}
	return errors.Is(err, errGaveUp)
}

// refresh renews the lease every LeaseTTL/3 until ctx ends or a renewal
// fails, which marks the lease lost.
func (b *Bridge) refresh(ctx context.Context, ch, name string, g *leaseGuard) {
	ttl := b.opts.LeaseTTL
	for sleep(ctx, ttl/3) {
		start := time.Now()
		actx, cancel := context.WithTimeout(ctx, ttl/3)
		ok, err := b.leases.Acquire(actx, name, b.holder, ttl)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil || !ok {
			g.lost.Store(true)
			if err == nil {
				err = errors.New("another instance holds it")
			}
			b.log.Warn("channel lease lost; stopped listening", "channel", ch, "err", err)
			return
		}
		g.extend(start, ttl)
	}
}

// listen keeps a connection LISTENing on ch and publishes what arrives,
// reconnecting with backoff, until ctx ends (nil) or Postgres stays out of
// reach for MaxDisconnected (errGaveUp).
func (b *Bridge) listen(ctx context.Context, ch string, st *state, g *leaseGuard) error {
	var bo backoff
	down := time.Now()
	first := true
	for ctx.Err() == nil {
		conn, err := b.connect(ctx, "notify")
		if err == nil {
			if _, err = conn.Exec(ctx, "LISTEN "+pgx.Identifier{ch}.Sanitize()); err != nil {
				b.closeConn(conn)
				err = fmt.Errorf("pgbridge: LISTEN %q: %w", ch, err)
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			st.set(fmt.Errorf("connecting: %w", err))
			if time.Since(down) > b.opts.MaxDisconnected {
				b.log.Error("cannot reach Postgres; giving the channel up", "channel", ch, "for", time.Since(down).Round(time.Millisecond), "err", err)
				return errGaveUp
			}
			b.log.Warn("cannot listen; retrying", "channel", ch, "err", err)
			sleep(ctx, bo.next())
			continue
		}
		if !first {
			b.m.reconnect.WithLabelValues(ch).Inc()
			b.log.Info("listening again", "channel", ch, "after", time.Since(down).Round(time.Millisecond))
		}
		first = false
		bo.reset()
		st.set(nil)
		b.m.connected.WithLabelValues(ch).Set(1)
		err = b.serve(ctx, conn, ch, g)
		b.m.connected.WithLabelValues(ch).Set(0)
		b.closeConn(conn)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errLeaseExpired) {
			return nil
		}
		down = time.Now()
		st.set(fmt.Errorf("reconnecting: %w", err))
		b.log.Warn("listening connection lost; reconnecting", "channel", ch, "err", err)
		sleep(ctx, bo.next())
	}
	return nil
}

// serve publishes conn's notifications until the connection fails, ctx ends
// or the lease can no longer be vouched for.
func (b *Bridge) serve(ctx context.Context, conn *pgx.Conn, ch string, g *leaseGuard) error {
	var expired bool
	var lim logLimit
	err := b.wait(ctx, conn, func(payload string) bool {
		if !g.valid() {
			expired = true
			return false
		}
		b.handle(ctx, ch, payload, g, &lim)
		return true
	})
	if expired {
		return errLeaseExpired
	}
	return err
}

// wait hands every notification conn receives to fn until fn returns
// false (nil), the connection fails or ctx ends. A connection silent for
// KeepAlive is pinged, so a dead one is noticed.
func (b *Bridge) wait(ctx context.Context, conn *pgx.Conn, fn func(payload string) bool) error {
	for {
		wctx, cancel := context.WithTimeout(ctx, b.opts.KeepAlive)
		n, err := conn.WaitForNotification(wctx)
		timedOut := wctx.Err() != nil
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if timedOut && !conn.IsClosed() {
				pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
				err = conn.Ping(pctx)
				pcancel()
				if err != nil {
					return fmt.Errorf("pgbridge: keepalive: %w", err)
				}
				continue
			}
			return fmt.Errorf("pgbridge: wait for notification: %w", err)
		}
		if !fn(n.Payload) {
			return nil
		}
	}
}

// handle publishes one notification, retrying a backend that is
// unavailable for up to BatchTimeout while the lease holds.
func (b *Bridge) handle(ctx context.Context, ch, payload string, g *leaseGuard, lim *logLimit) {
	b.m.received.WithLabelValues(ch).Inc()
	msg, err := b.opts.Route(ch, []byte(payload))
	var env []byte
	var reason string
	if err == nil {
		env, reason, err = msg.envelope()
	} else {
		reason = invalidReason(err)
	}
	if err != nil {
		b.m.invalid.WithLabelValues(ch, reason).Inc()
		if reason == reasonSkipped {
			return
		}
		if ok, suppressed := lim.allow(); ok {
			b.log.Warn("notification not published", "channel", ch, "reason", reason, "err", err,
				"bytes", len(payload), "payload", clip(payload, 200), "suppressed_since_last", suppressed)
		}
		return
	}
	start := time.Now()
	var bo backoff
	for {
		_, err := b.node.PublishEnvelope(ctx, msg.Topic, env, b.publishOptions()...)
		if err == nil {
			b.m.published.WithLabelValues(ch).Inc()
			return
		}
		if ctx.Err() == nil && errors.Is(err, fabric.ErrBackendUnavailable) && g.valid() &&
			time.Since(start) < b.opts.BatchTimeout && sleep(ctx, bo.next()) {
			continue
		}
		b.m.failed.WithLabelValues(ch).Inc()
		b.log.Warn("notification publish failed", "channel", ch, "topic", msg.Topic, "err", err)
		return
	}
}

// publishOptions are the options of every bridged publish.
func (b *Bridge) publishOptions() []fabric.PublishOption {
	if b.opts.Persist {
		return []fabric.PublishOption{fabric.Persist()}
	}
	return nil
}

// logLimit lets one log line through per second (a flood of bad payloads
// is counted in the metrics, not written out one by one); it belongs to
// one goroutine.
type logLimit struct {
	last       time.Time
	suppressed int
}

// allow reports whether to log now, and how many lines were held back
// since the last one.
func (l *logLimit) allow() (bool, int) {
	if now := time.Now(); now.Sub(l.last) >= time.Second {
		n := l.suppressed
		l.last, l.suppressed = now, 0
		return true, n
	}
	l.suppressed++
	return false, 0
}
