package jetstream_test

import (
	"context"
	"errors"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

func startLimiters(t *testing.T, insts []*fabrictest.Instance, opts jetstream.RateLimitOptions) []*jetstream.RateLimiter {
	t.Helper()
	ls := make([]*jetstream.RateLimiter, len(insts))
	for i, inst := range insts {
		o := opts
		o.Prefix = inst.Broker.Prefix()
		o.Logger = fabrictest.Logger(t)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		l, err := jetstream.NewRateLimiter(ctx, inst.JS, o)
		cancel()
		if err != nil {
			t.Fatalf("instance %d: %v", i, err)
		}
		t.Cleanup(func() { l.Close() })
		ls[i] = l
	}
	return ls
}

// windowCounts groups admissions by the interval they were admitted in,
// given the end of that interval as each Consume reported it (start of the
// call + resetAfter). Interval ends are Interval apart, so ends within half
// an interval of each other are the same interval.
func windowCounts(ends []time.Time, interval time.Duration) []int {
	if len(ends) == 0 {
		return nil
	}
	sort.Slice(ends, func(i, j int) bool { return ends[i].Before(ends[j]) })
	first := ends[0]
	var counts []int
	for _, e := range ends {
		i := int((e.Sub(first) + interval/2) / interval)
		for len(counts) <= i {
			counts = append(counts, 0)
		}
		counts[i]++
	}
	return counts
}

// TestRateLimitCluster: three instances × 50 goroutines hammer one key; no
// interval admits more than Points across the cluster. Then bans, unbans
// and resets made on one instance hold on the others.
func TestRateLimitCluster(t *testing.T) {
	insts := fabrictest.Cluster(t, 3, fabrictest.Options{})
	const points, interval = 100, time.Second
	ls := startLimiters(t, insts, jetstream.RateLimitOptions{Points: points, Interval: interval, Replicas: 3})
	ctx := testCtx(t, 90*time.Second)

	t.Run("hot key", func(t *testing.T) {
		var (
			mu       sync.Mutex
			ends     []time.Time
			refused  int
			rpcCount int
		)
		deadline := time.Now().Add(3*interval + interval/2)
		var wg sync.WaitGroup
		for _, l := range ls {
			for range 50 {
				wg.Go(func() {
					for time.Now().Before(deadline) {
						before := time.Now()
						ok, _, reset, err := l.Consume(ctx, "hot", 1)
						if err != nil {
							t.Error(err)
							return
						}
						mu.Lock()
						rpcCount++
						if ok {
							ends = append(ends, before.Add(reset))
						} else {
							refused++
						}
						mu.Unlock()
						time.Sleep(time.Millisecond)
					}
				})
			}
		}
		wg.Wait()
		counts := windowCounts(ends, interval)
		t.Logf("admitted per interval: %v (points %d); %d calls, %d refused", counts, points, rpcCount, refused)
		if len(counts) < 3 {
			t.Fatalf("admissions span %d intervals, want at least 3", len(counts))
		}
		for i, n := range counts {
			if n > points {
				t.Errorf("interval %d admitted %d > %d points", i, n, points)
			}
		}
		// Every full interval (not the first or last, which the run cuts)
		// should admit most of its points: leases must not strand many.
		for i, n := range counts[1 : len(counts)-1] {
			if n < points/2 {
				t.Errorf("interval %d admitted only %d of %d points", i+1, n, points)
			}
		}
	})

	t.Run("ban and unban", func(t *testing.T) {
		if err := ls[0].Ban(ctx, "mallory", time.Minute); err != nil {
			t.Fatal(err)
		}
		for i, l := range ls {
			fabrictest.WaitFor(t, 5*time.Second, "ban seen everywhere", func() bool {
				ok, _, reset, err := l.Consume(ctx, "mallory", 1)
				return err == nil && !ok && reset > 50*time.Second
			})
			_ = i
		}
		if err := ls[1].Unban(ctx, "mallory"); err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			fabrictest.WaitFor(t, 5*time.Second, "unban seen everywhere", func() bool {
				ok, _, _, err := l.Consume(ctx, "mallory", 1)
				return err == nil && ok
			})
		}
		// A short ban ends by itself.
		if err := ls[2].Ban(ctx, "brief", 300*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if ok, _, _, _ := ls[2].Consume(ctx, "brief", 1); ok {
			t.Fatal("admitted right after Ban")
		}
		time.Sleep(400 * time.Millisecond)
		if ok, _, _, err := ls[2].Consume(ctx, "brief", 1); !ok || err != nil {
			t.Fatalf("refused after the ban ended: %v", err)
		}
	})

	t.Run("reset", func(t *testing.T) {
		// A long interval, so that only the reset can refill the bucket.
		rl := startLimiters(t, insts, jetstream.RateLimitOptions{Name: "long", Points: 50, Interval: time.Hour})
		total := 0
		for _, l := range rl[:2] { // exhaust "eve" from two instances
			for {
				ok, _, _, err := l.Consume(ctx, "eve", 7)
				if err != nil {
					t.Fatal(err)
				}
				if !ok {
					break
				}
				total += 7
			}
		}
		if total > 50 {
			t.Fatalf("admitted %d > 50 points", total)
		}
		if ok, _, _, _ := rl[0].Consume(ctx, "eve", 51); ok {
			t.Fatal("a cost above the points was admitted")
		}
		if err := rl[2].Reset(ctx, "eve"); err != nil {
			t.Fatal(err)
		}
		for _, l := range rl[:2] {
			fabrictest.WaitFor(t, 5*time.Second, "reset seen everywhere", func() bool {
				ok, _, _, err := l.Consume(ctx, "eve", 1)
				return err == nil && ok
			})
		}
	})

	t.Run("block duration", func(t *testing.T) {
		bl := startLimiters(t, insts, jetstream.RateLimitOptions{Name: "login", Points: 3, Interval: time.Minute, BlockDuration: 2 * time.Second})
		for range 3 {
			if ok, _, _, err := bl[0].Consume(ctx, "trudy", 1); !ok || err != nil {
				t.Fatalf("refused within the points: %v", err)
			}
		}
		ok, _, reset, _ := bl[0].Consume(ctx, "trudy", 1)
		if ok || reset < time.Second {
			t.Fatalf("4th call: allowed=%v resetAfter=%s, want a refusal with the 2s block", ok, reset)
		}
		fabrictest.WaitFor(t, 5*time.Second, "block seen on another instance", func() bool {
			ok, _, reset, _ := bl[1].Consume(ctx, "trudy", 1)
			return !ok && reset > time.Second/2 && reset <= 2*time.Second
		})
	})
}

// TestRateLimitRPC: LimitRPC refuses calls past the points with
// RATE_LIMITED and a retryAfter, over a real WebSocket.
func TestRateLimitRPC(t *testing.T) {
	var limiter *jetstream.RateLimiter
	var ready sync.WaitGroup
	ready.Add(1)
	before := func(ctx context.Context, call *fabric.Call) error {
		ready.Wait()
		return fabric.LimitRPC(limiter, fabric.KeyByUser, 1, nil)(ctx, call)
	}
	// Client frames outside the protocol (the edge's Message hook) share
	// the same limiter, keyed the same way.
	var passed, refused atomic.Int64
	cfg := userNode()
	cfg.BeforeExecute = before
	cfg.Hooks.Message = func(c *fabric.Client, data []byte, binary bool) {
		ready.Wait()
		fabric.LimitMessages(limiter, fabric.KeyByUser, 1,
			func(*fabric.Client, []byte, bool) { passed.Add(1) },
			func(_ *fabric.Client, retryAfter time.Duration) {
				if retryAfter > 0 {
					refused.Add(1)
				}
			})(c, data, binary)
	}
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: cfg})
	limiter = startLimiters(t, []*fabrictest.Instance{inst}, jetstream.RateLimitOptions{Points: 3, Interval: time.Minute})[0]
	ready.Done()
	inst.Node.HandleRPC("test/echo", func(_ context.Context, call *fabric.Call) (any, error) { return "ok", nil })
	ctx := testCtx(t, 20*time.Second)

	c := dialUser(inst, "frank")
	for i := range 3 {
		if _, err := c.Call(ctx, "test/echo"); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	_, err := c.Call(ctx, "test/echo")
	var rpcErr *wsclient.RPCError
	if !errors.As(err, &rpcErr) || rpcErr.Code != fabric.CodeRateLimited {
		t.Fatalf("4th call: %v, want RATE_LIMITED", err)
	}
	// Another user has its own bucket.
	if _, err := dialUser(inst, "grace").Call(ctx, "test/echo"); err != nil {
		t.Fatalf("another user refused: %v", err)
	}
	// frank has used his 3 points on calls: his raw frames are refused,
	// heidi's pass.
	heidi := dialUser(inst, "heidi")
	for _, c := range []*wsclient.Client{c, heidi} {
		if err := c.SendRaw([]byte("hello")); err != nil {
			t.Fatal(err)
		}
	}
	fabrictest.WaitFor(t, 5*time.Second, "frames handled", func() bool { return passed.Load()+refused.Load() == 2 })
	if passed.Load() != 1 || refused.Load() != 1 {
		t.Fatalf("passed %d, refused %d; want 1 and 1", passed.Load(), refused.Load())
	}
	// The result carries retryAfter in milliseconds.
	res := inst.Node.Execute(ctx, &fabric.Call{Client: clientOf(t, inst, "frank"), Path: "test/echo", ID: "x"})
	if res.Code != fabric.CodeRateLimited || res.RetryAfter <= 0 || res.RetryAfter > 60_000 {
		t.Fatalf("Execute result %+v, want RATE_LIMITED with 0 < retryAfter <= 60000", res)
	}
}

// TestRateLimitLeaseSlack measures what leasing costs: traffic that moves
// from one instance to another strands at most the first one's last lease,
// and a busy key costs a round trip for only a few of its calls.
func TestRateLimitLeaseSlack(t *testing.T) {
	ns := fabrictest.StartNATS(t, nil)
	prefix := fabrictest.TestPrefix(t)
	a := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: prefix})
	b := fabrictest.NewInstance(t, fabrictest.Options{NATSURL: ns.ClientURL(), Prefix: prefix})
	const points = 1000
	ls := startLimiters(t, []*fabrictest.Instance{a, b}, jetstream.RateLimitOptions{Points: points, Interval: time.Hour})
	ctx := testCtx(t, 30*time.Second)

	admitted := 0
	for range 10 {
		if ok, _, _, err := ls[0].Consume(ctx, "k", 1); !ok || err != nil {
			t.Fatalf("refused: %v", err)
		}
		admitted++
	}
	leasesA := ls[0].Leases()
	for {
		ok, _, _, err := ls[1].Consume(ctx, "k", 1)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		admitted++
	}
	stranded := points - admitted
	t.Logf("instance A: 10 calls, %d round trips; instance B: %d calls, %d round trips; admitted %d of %d (%d stranded on A)",
		leasesA, admitted-10, ls[1].Leases(), admitted, points, stranded)
	// A leased 1+2+4+8 = 15 for its 10 calls: 5 stranded.
	if stranded < 0 || stranded > 8 {
		t.Fatalf("%d tokens stranded, want at most A's last lease (8)", stranded)
	}
	if leasesA > 4 {
		t.Fatalf("A made %d round trips for 10 calls, want at most 4", leasesA)
	}
	if r := ls[1].Leases(); r > uint64(admitted-10)/10 {
		t.Fatalf("B made %d round trips for %d calls: leasing is not amortised", r, admitted-10)
	}
}
