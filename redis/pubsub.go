package redis

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// psHandler takes the messages of one channel. onMessage runs on the
// connection's reading goroutine: it must not block (queue and return).
type psHandler interface {
	onMessage(payload string)
}

// psListener is told when a pub/sub connection came back after a break,
// its channels subscribed again: messages in between were lost.
type psListener interface {
	onResubscribed()
}

// pubsub owns the backend's pub/sub connections: one dedicated connection
// on a single server (or Sentinel), one per partition with sharded pub/sub
// (each partition is one hash slot, so one node), connected while they
// have channels. Subscriptions are reconciled by one goroutine per
// connection: callers change what is wanted, the goroutine sends SUBSCRIBE
// and UNSUBSCRIBE (batched) until the server has exactly that, and after a
// broken connection it reconnects with backoff and subscribes everything
// again.
type pubsub struct {
	b     *Backend
	conns []*psConn

	chans sync.Map // channel → *psChan: the handlers messages go to

	orphans    atomic.Int64 // messages for channels without a handler
	reconnects atomic.Int64 // connections re-established after a break

	lmu       sync.Mutex
	listeners map[psListener]struct{}

	stop chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// psChan is one channel's handlers (copy on write).
type psChan struct {
	handlers atomic.Pointer[[]psHandler]
}

// psConn is one pub/sub connection and the channels wanted on it.
type psConn struct {
	ps   *pubsub
	slot string // a key of the connection's slot (sharded), to route it
	kick chan struct{}

	mu        sync.Mutex
	want      map[string]int  // channel → handlers registered
	have      map[string]bool // subscribed on the server
	leaving   map[string]bool // an UNSUBSCRIBE of it is in flight
	connected bool            // a connection is being served
	down      bool            // the last connection broke and no new one is in sync yet
	broken    bool            // a channel was unsubscribed by the server (slot moved)
	waiters   map[string][]chan struct{}
}

// maxBatch bounds the channels of one SUBSCRIBE or UNSUBSCRIBE.
const maxBatch = 512

func newPubsub(b *Backend) *pubsub {
	ps := &pubsub{b: b, listeners: map[psListener]struct{}{}, stop: make(chan struct{})}
	n := 1
	if b.sharded {
		n = b.opts.Partitions
	}
	for i := range n {
		c := &psConn{ps: ps, kick: make(chan struct{}, 1), want: map[string]int{}, have: map[string]bool{},
			leaving: map[string]bool{}, waiters: map[string][]chan struct{}{}}
		if b.sharded {
			c.slot = b.key(i, "x", "")
		}
		ps.conns = append(ps.conns, c)
		ps.wg.Add(1)
		go c.run()
	}
	return ps
}

func (ps *pubsub) close() {
	ps.once.Do(func() {
		close(ps.stop)
		ps.wg.Wait()
	})
}

// connOf returns the connection that carries channel (whose hash tag is its
// partition's).
func (ps *pubsub) connOf(channel string) *psConn {
	if len(ps.conns) == 1 {
		return ps.conns[0]
	}
	return ps.conns[partitionOfKey(channel)%len(ps.conns)]
}

// partitionOfKey reads the partition from a key's hash tag.
func partitionOfKey(k string) int {
	i := 0
	for i < len(k) && k[i] != '{' {
		i++
	}
	j := i + 1
	for j < len(k) && k[j] != '}' {
		j++
	}
	if j >= len(k) {
		return 0
	}
	p, _ := strconv.Atoi(k[i+1 : j])
	return p
}

// addListener registers l for reconnections.
func (ps *pubsub) addListener(l psListener) {
	ps.lmu.Lock()
	ps.listeners[l] = struct{}{}
	ps.lmu.Unlock()
}

func (ps *pubsub) removeListener(l psListener) {
	ps.lmu.Lock()
	delete(ps.listeners, l)
	ps.lmu.Unlock()
}

func (ps *pubsub) resubscribed() {
	ps.lmu.Lock()
	ls := make([]psListener, 0, len(ps.listeners))
	for l := range ps.listeners {
		ls = append(ls, l)
	}
	ps.lmu.Unlock()
	for _, l := range ls {
		l.onResubscribed()
	}
}

// subscribe adds h to channel's handlers. With wait, it returns once the
// server has confirmed the subscription (or at once when the connection is
// down: it is subscribed when the connection is back), bounded by ctx;
// without, it returns at once. The handler gets messages as soon as the
// server sends them, possibly before subscribe returns.
func (ps *pubsub) subscribe(ctx context.Context, channel string, h psHandler, wait bool) error {
	c := ps.connOf(channel)
	c.mu.Lock()
	// Handlers of c's channels only change under c.mu.
	v, _ := ps.chans.LoadOrStore(channel, &psChan{})
	pc := v.(*psChan)
	var next []psHandler
	if old := pc.handlers.Load(); old != nil {
		next = append(slices.Clip(*old), h)
	} else {
		next = []psHandler{h}
	}
	pc.handlers.Store(&next)
	c.want[channel]++
	if c.have[channel] && !c.leaving[channel] {
		c.mu.Unlock()
		return nil
	}
	var done chan struct{}
	if wait && !c.down {
		done = make(chan struct{})
		c.waiters[channel] = append(c.waiters[channel], done)
	}
	c.mu.Unlock()
	c.poke()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-ps.stop:
		return ErrClosed
	}
}

// unsubscribe removes h from channel's handlers; the server is told
// asynchronously once the channel has none.
func (ps *pubsub) unsubscribe(channel string, h psHandler) {
	c := ps.connOf(channel)
	c.mu.Lock()
	v, ok := ps.chans.Load(channel)
	if !ok {
		c.mu.Unlock()
		return
	}
	pc := v.(*psChan)
	old := pc.handlers.Load()
	i := -1
	if old != nil {
		i = slices.Index(*old, h)
	}
	if i < 0 {
		c.mu.Unlock()
		return
	}
	if len(*old) == 1 {
		pc.handlers.Store(nil)
		ps.chans.Delete(channel)
	} else {
		next := slices.Delete(slices.Clone(*old), i, i+1)
		pc.handlers.Store(&next)
	}
	if c.want[channel]--; c.want[channel] <= 0 {
		delete(c.want, channel)
	}
	c.mu.Unlock()
	c.poke()
}

// dispatch hands a message to its channel's handlers.
func (ps *pubsub) dispatch(channel, payload string) {
	v, ok := ps.chans.Load(channel)
	if !ok {
		ps.orphans.Add(1)
		return
	}
	hs := v.(*psChan).handlers.Load()
	if hs == nil || len(*hs) == 0 {
		ps.orphans.Add(1)
		return
	}
	for _, h := range *hs {
		h.onMessage(payload)
	}
}

func (c *psConn) poke() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// run keeps the connection's subscriptions equal to what is wanted until
// the backend closes.
func (c *psConn) run() {
	ps := c.ps
	defer ps.wg.Done()
	backoff := 50 * time.Millisecond
	broke := false // the previous connection broke: messages may be lost
	for {
		// Connect only while something is wanted.
		c.mu.Lock()
		idle := len(c.want) == 0
		c.mu.Unlock()
		if idle {
			select {
			case <-ps.stop:
				return
			case <-c.kick:
				continue
			}
		}
		dc, cancel := ps.b.client.Dedicate()
		lost := dc.SetPubSubHooks(rueidis.PubSubHooks{
			OnMessage:      func(m rueidis.PubSubMessage) { ps.dispatch(m.Channel, m.Message) },
			OnSubscription: c.onSubscription,
		})
		c.mu.Lock()
		c.connected, c.broken = true, false
		c.mu.Unlock()
		err := c.serve(dc, lost, &broke)
		failed := err != nil && !errors.Is(err, errIdle)
		c.mu.Lock()
		c.connected = false
		if failed {
			c.down = true
		}
		clear(c.have)
		clear(c.leaving)
		// Waiters of a broken connection are released: their channels are
		// subscribed once it is back, which they do not wait for.
		for ch, ws := range c.waiters {
			for _, w := range ws {
				close(w)
			}
			delete(c.waiters, ch)
		}
		c.mu.Unlock()
		dc.Close()
		cancel()
		if err == nil { // stopping
			return
		}
		if !failed {
			continue // nothing wanted any more: closed on purpose
		}
		if !broke {
			ps.b.logFailure("redis: pub/sub connection lost; reconnecting", err)
		} else {
			ps.b.log.Debug("redis: pub/sub reconnection failed", "err", err, "backoff", backoff)
		}
		broke = true
		t := time.NewTimer(backoff)
		select {
		case <-ps.stop:
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// errIdle ends a connection that has no channel left.
var errIdle = errors.New("no channel wanted")

// serve reconciles subscriptions on dc until it breaks (its error), the
// backend closes (nil) or nothing is wanted any more (errIdle). After the
// first reconciliation of a connection that replaced a broken one, the
// listeners are told.
func (c *psConn) serve(dc rueidis.DedicatedClient, lost <-chan error, broke *bool) error {
	ps := c.ps
	synced := false
	for {
		if err := c.reconcile(dc); err != nil {
			return err
		}
		if !synced {
			synced = true
			c.mu.Lock()
			c.down = false
			c.mu.Unlock()
			if *broke {
				*broke = false
				ps.b.log.Info("redis: pub/sub connection back; channels subscribed again")
				ps.reconnects.Add(1)
				ps.resubscribed()
			}
		}
		c.mu.Lock()
		idle := len(c.want) == 0 && len(c.have) == 0
		c.mu.Unlock()
		if idle && ps.b.sharded {
			return errIdle // a partition's connection is kept only while used
		}
		select {
		case <-ps.stop:
			return nil
		case err, ok := <-lost:
			if !ok || err == nil {
				err = errors.New("pub/sub connection closed")
			}
			return err
		case <-c.kick:
		}
	}
}

// reconcile sends the SUBSCRIBEs and UNSUBSCRIBEs that make the server's
// subscriptions what is wanted, and releases the waiters of the channels
// subscribed.
func (c *psConn) reconcile(dc rueidis.DedicatedClient) error {
	ps := c.ps
	for {
		c.mu.Lock()
		if c.broken {
			c.mu.Unlock()
			return errors.New("the server dropped a subscription (slot migrated?)")
		}
		var add, drop []string
		for ch := range c.want {
			if !c.have[ch] {
				add = append(add, ch)
				if len(add) == maxBatch {
					break
				}
			}
		}
		for ch := range c.have {
			if c.want[ch] == 0 {
				drop = append(drop, ch)
				c.leaving[ch] = true // a subscribe meanwhile waits for the next round
				if len(drop) == maxBatch {
					break
				}
			}
		}
		c.mu.Unlock()
		if len(add) == 0 && len(drop) == 0 {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), ps.b.opts.Timeout)
		var cmds rueidis.Commands
		if len(drop) > 0 {
			cmds = append(cmds, c.unsubCmd(dc, drop))
		}
		if len(add) > 0 {
			cmds = append(cmds, c.subCmd(dc, add))
		}
		var err error
		for _, r := range dc.DoMulti(ctx, cmds...) {
			if e := r.Error(); e != nil && err == nil {
				err = e
			}
		}
		cancel()
		if err != nil {
			return err
		}
		c.mu.Lock()
		for _, ch := range drop {
			delete(c.have, ch)
			delete(c.leaving, ch)
		}
		for _, ch := range add {
			c.have[ch] = true
			for _, w := range c.waiters[ch] {
				close(w)
			}
			delete(c.waiters, ch)
		}
		c.mu.Unlock()
	}
}

func (c *psConn) subCmd(dc rueidis.DedicatedClient, chs []string) rueidis.Completed {
	if c.ps.b.sharded {
		return dc.B().Ssubscribe().Channel(chs...).Build()
	}
	return dc.B().Subscribe().Channel(chs...).Build()
}

func (c *psConn) unsubCmd(dc rueidis.DedicatedClient, chs []string) rueidis.Completed {
	if c.ps.b.sharded {
		return dc.B().Sunsubscribe().Channel(chs...).Build()
	}
	return dc.B().Unsubscribe().Channel(chs...).Build()
}

// onSubscription notices the server dropping a channel still wanted (a
// slot migrated away on a cluster): the connection is then rebuilt.
func (c *psConn) onSubscription(s rueidis.PubSubSubscription) {
	if s.Kind != "sunsubscribe" && s.Kind != "unsubscribe" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.want[s.Channel] > 0 && c.have[s.Channel] && !c.leaving[s.Channel] {
		c.broken = true
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
}

// connectedAll reports whether every pub/sub connection that has channels
// is up.
func (ps *pubsub) connectedAll() bool {
	for _, c := range ps.conns {
		c.mu.Lock()
		bad := len(c.want) > 0 && (!c.connected || c.down)
		c.mu.Unlock()
		if bad {
			return false
		}
	}
	return true
}
