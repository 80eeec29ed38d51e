package main

// The rpc-overload scenario: the point of admission control, measured. A
// server process (this binary's rpc-server subcommand: a Node on the memory
// backend, the WebSocket edge, and bench/work, an RPC handler that burns a
// fixed amount of CPU) is driven by WebSocket clients. First, on a server
// without admission:
//
//  1. unloaded: one connection, one call at a time: the latency floor;
//  2. capacity: eight connections per core, one call at a time each: the
//     calls per second the server sustains.
//
// Then, on a fresh server with admission on and one with it off:
//
//  3. overload: --overload × that rate (default 3×), open loop over
//     --conns connections, for --duration; latency is measured from each
//     call's scheduled time, so a server that falls behind is charged for
//     it.
//
// With admission on, bench/work is the class "work" with a Predicate rule:
// refused under MEMORY pressure, or while --max-in-flight calls run
// (admission.InFlight; default one less than the cores, so that a core is
// left for the I/O that answers and refuses calls). CPU overload shows in
// no pressure signal: the calls wait in the sockets, not in memory.
//
//	fabric-bench --scenario rpc-overload [--admission both|on|off] [--work 2ms] [--overload 3]

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/admission"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// overloadResult is one rpc-overload run (admission on or off).
type overloadResult struct {
	Admission       bool    `json:"admission"`
	WorkMS          float64 `json:"work_ms"`
	MaxInFlight     int     `json:"max_in_flight,omitempty"`
	Conns           int     `json:"conns"`
	Unloaded        latency `json:"unloaded"`
	CapacityPerS    float64 `json:"capacity_per_s"`
	OfferedPerS     float64 `json:"offered_per_s"`
	Sent            uint64  `json:"sent"`
	OK              uint64  `json:"ok"`
	Overloaded      uint64  `json:"overloaded"`
	OtherErrors     uint64  `json:"other_errors"`
	Unanswered      uint64  `json:"unanswered"`
	AcceptedPerS    float64 `json:"accepted_per_s"`
	Accepted        latency `json:"accepted_latency"`
	RefusedLatency  latency `json:"refused_latency"`
	ServerRSSBase   float64 `json:"server_rss_base_mib"`
	ServerRSSPeak   float64 `json:"server_rss_peak_mib"`
	MemoryThreshold float64 `json:"memory_threshold_mib"`
	ServerCPU       float64 `json:"server_cpu_percent"`
	P99Ratio        float64 `json:"accepted_p99_over_unloaded_p99"`
	Pressure        string  `json:"pressure_at_end"`
}

func runRPCOverload(o options, stdout, stderr io.Writer) int {
	modes := map[string][]bool{"both": {true, false}, "on": {true}, "off": {false}}[o.Admission]
	if modes == nil {
		fmt.Fprintf(stderr, "fabric-bench: --admission %q: want both, on or off\n", o.Admission)
		return 2
	}
	base, err := overloadBaseline(o, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "fabric-bench:", err)
		return 1
	}
	var results []overloadResult
	for _, on := range modes {
		r, err := overloadRun(o, on, base, stderr)
		if err != nil {
			fmt.Fprintln(stderr, "fabric-bench:", err)
			return 1
		}
		results = append(results, *r)
	}
	if o.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(results)
		return 0
	}
	for _, r := range results {
		mode := "off"
		if r.Admission {
			mode = fmt.Sprintf("on (max in flight %d)", r.MaxInFlight)
		}
		fmt.Fprintf(stdout, "\nrpc-overload, admission %s: %.1fms of CPU per call, %d connections, %d cores\n", mode, r.WorkMS, r.Conns, runtime.NumCPU())
		fmt.Fprintf(stdout, "  unloaded        p50 %.2fms  p99 %.2fms  (%d calls, one at a time)\n", r.Unloaded.P50, r.Unloaded.P99, r.Unloaded.Count)
		fmt.Fprintf(stdout, "  capacity        %.0f calls/s (eight connections per core, closed loop, admission off)\n", r.CapacityPerS)
		fmt.Fprintf(stdout, "  offered         %.0f calls/s for the window: %d sent\n", r.OfferedPerS, r.Sent)
		fmt.Fprintf(stdout, "  answered        %d ok (%.0f/s), %d OVERLOADED, %d other errors, %d unanswered at the end\n", r.OK, r.AcceptedPerS, r.Overloaded, r.OtherErrors, r.Unanswered)
		fmt.Fprintf(stdout, "  accepted calls  p50 %.2fms  p99 %.2fms  max %.2fms  (p99 %.1f× the unloaded p99)\n", r.Accepted.P50, r.Accepted.P99, r.Accepted.Max, r.P99Ratio)
		if r.RefusedLatency.Count > 0 {
			fmt.Fprintf(stdout, "  refused calls   p50 %.2fms  p99 %.2fms\n", r.RefusedLatency.P50, r.RefusedLatency.P99)
		}
		fmt.Fprintf(stdout, "  server          RSS %.1f MiB at rest, peak %.1f MiB (MEMORY threshold %.0f MiB); CPU %.0f%%; pressure at the end %s\n",
			r.ServerRSSBase, r.ServerRSSPeak, r.MemoryThreshold, r.ServerCPU, r.Pressure)
	}
	return 0
}

// baseline is what the server does without overload.
type baseline struct {
	unloaded latency
	capacity float64
}

// overloadBaseline measures the unloaded latency and the capacity on a
// server without admission.
func overloadBaseline(o options, stderr io.Writer) (baseline, error) {
	var b baseline
	srv, err := startRPCServer(o, false)
	if err != nil {
		return b, err
	}
	defer srv.stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	one, err := dialN(ctx, srv.url, 1)
	if err != nil {
		return b, err
	}
	defer closeAll(one)
	var h hist
	for i := range 20 { // warm up
		_, _ = one[0].Call(ctx, "bench/work", i)
	}
	for start := time.Now(); time.Since(start) < 3*time.Second; {
		t0 := time.Now()
		if _, err := one[0].Call(ctx, "bench/work", 0); err != nil {
			return b, fmt.Errorf("unloaded call: %w", err)
		}
		h.record(0, time.Since(t0))
	}
	b.unloaded = summarize(h.snapshot())
	closed, err := dialN(ctx, srv.url, 8*runtime.NumCPU())
	if err != nil {
		return b, err
	}
	defer closeAll(closed)
	var done atomic.Uint64
	var wg sync.WaitGroup
	capStart := time.Now()
	for _, c := range closed {
		wg.Go(func() {
			for time.Since(capStart) < 3*time.Second {
				if _, err := c.Call(ctx, "bench/work", 0); err == nil {
					done.Add(1)
				}
			}
		})
	}
	wg.Wait()
	b.capacity = float64(done.Load()) / time.Since(capStart).Seconds()
	if !o.Quiet {
		fmt.Fprintf(stderr, "unloaded p50 %.2fms p99 %.2fms; capacity %.0f calls/s\n", b.unloaded.P50, b.unloaded.P99, b.capacity)
	}
	return b, nil
}

func closeAll(cs []*wsclient.Client) {
	for _, c := range cs {
		c.Close()
	}
}

// overloadRun spawns the server with admission on or off and overloads it.
func overloadRun(o options, on bool, b baseline, stderr io.Writer) (*overloadResult, error) {
	res := &overloadResult{Admission: on, WorkMS: float64(o.Work) / float64(time.Millisecond), Conns: o.Conns,
		Unloaded: b.unloaded, CapacityPerS: b.capacity, OfferedPerS: o.Overload * b.capacity}
	if on {
		res.MaxInFlight = o.MaxInFlight
	}
	srv, err := startRPCServer(o, on)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if !o.Quiet {
		fmt.Fprintf(stderr, "admission %s: offering %.0f calls/s for %s\n", map[bool]string{true: "on", false: "off"}[on], res.OfferedPerS, o.Duration)
	}

	// 3. Overload, open loop.
	conns, err := dialN(ctx, srv.url, o.Conns)
	if err != nil {
		return nil, err
	}
	runtime.GC()
	base := readProc(srv.pid())
	res.ServerRSSBase = mib(base.rss)
	var peak atomic.Int64
	peak.Store(base.rss)
	sampling, stopSampling := context.WithCancel(ctx)
	var samplerWG sync.WaitGroup
	samplerWG.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sampling.Done():
				return
			case <-t.C:
				if s := readProc(srv.pid()); s.rss > peak.Load() {
					peak.Store(s.rss)
				}
			}
		}
	})
	var okH, refusedH hist
	var sent, ok, overloaded, other atomic.Uint64
	callCtx, cancelCalls := context.WithCancel(ctx)
	defer cancelCalls()
	var calls sync.WaitGroup
	interval := time.Duration(float64(time.Second) / res.OfferedPerS)
	start := time.Now()
	for i := 0; ; i++ {
		due := start.Add(time.Duration(i) * interval)
		if due.Sub(start) >= o.Duration {
			break
		}
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		c := conns[i%len(conns)]
		sent.Add(1)
		calls.Go(func() {
			_, err := c.Call(callCtx, "bench/work", 0)
			took := time.Since(due)
			var re *wsclient.RPCError
			switch {
			case err == nil:
				ok.Add(1)
				okH.record(i, took)
			case errors.As(err, &re) && re.Code == fabric.CodeOverloaded:
				overloaded.Add(1)
				refusedH.record(i, took)
			case callCtx.Err() != nil:
			default:
				other.Add(1)
			}
		})
	}
	window := time.Since(start)
	waited := make(chan struct{})
	go func() { calls.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(max(o.Drain, 10*time.Second)):
	}
	answered := ok.Load() + overloaded.Load() + other.Load()
	res.Unanswered = sent.Load() - answered
	end := readProc(srv.pid())
	cancelCalls()
	<-waited
	stopSampling()
	samplerWG.Wait()
	res.Sent, res.OK, res.Overloaded, res.OtherErrors = sent.Load(), ok.Load(), overloaded.Load(), other.Load()
	res.AcceptedPerS = float64(res.OK) / window.Seconds()
	res.Accepted = summarize(okH.snapshot())
	res.RefusedLatency = summarize(refusedH.snapshot())
	res.ServerRSSPeak = mib(peak.Load())
	res.ServerCPU = cpuPercent(base, end)
	if res.Unloaded.P99 > 0 {
		res.P99Ratio = res.Accepted.P99 / res.Unloaded.P99
	}
	var st rpcServerStats
	if err := getJSON(srv.base+"/stats", &st); err == nil {
		res.MemoryThreshold = mib(int64(float64(st.Pressure.MemoryLimit) * fabric.DefaultPressureMemoryRatio))
		res.Pressure = string(st.Pressure.Reason)
	}
	closeAll(conns)
	return res, nil
}

func dialN(ctx context.Context, url string, n int) ([]*wsclient.Client, error) {
	out := make([]*wsclient.Client, n)
	for i := range out {
		c, err := wsclient.Dial(ctx, url, wsclient.Options{})
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", url, err)
		}
		out[i] = c
	}
	return out, nil
}

func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}

// rpcServerProc is a running rpc-server subprocess.
type rpcServerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	base  string // http://addr
	url   string // ws://addr/ws
}

func (s *rpcServerProc) pid() int { return s.cmd.Process.Pid }

func (s *rpcServerProc) stop() {
	_ = s.stdin.Close() // the server exits when its stdin closes
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

func startRPCServer(o options, on bool) (*rpcServerProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "rpc-server",
		"--admission="+fmt.Sprint(on), "--work="+o.Work.String(),
		fmt.Sprintf("--max-in-flight=%d", o.MaxInFlight), fmt.Sprintf("--memory-limit-mib=%d", o.MemoryLimitMiB))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &rpcServerProc{cmd: cmd, stdin: stdin}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		s.stop()
		return nil, fmt.Errorf("rpc-server did not start: %w", err)
	}
	s.base = strings.TrimSpace(line)
	s.url = "ws" + strings.TrimPrefix(s.base, "http") + "/ws"
	return s, nil
}

// rpcServerStats is what the rpc-server's /stats answers.
type rpcServerStats struct {
	Pressure fabric.Pressure `json:"pressure"`
	InFlight int             `json:"in_flight"`
}

// runRPCServer is the rpc-server subcommand: the server under test of
// rpc-overload. It prints its base URL on stdout and runs until stdin
// closes.
func runRPCServer(args []string) int {
	fs := flag.NewFlagSet("rpc-server", flag.ContinueOnError)
	on := fs.Bool("admission", true, "admission control on bench/work")
	work := fs.Duration("work", 2*time.Millisecond, "CPU time per bench/work call")
	maxInFlight := fs.Int("max-in-flight", max(1, runtime.NumCPU()-1), "bench/work calls running at once before OVERLOADED")
	memLimit := fs.Int64("memory-limit-mib", 512, "the MEMORY pressure signal's limit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	be := memory.New(memory.Options{})
	defer be.Close()
	var inflight admission.InFlight
	cfg := fabric.Config{Broker: be.Broker(), Pressure: fabric.PressureOptions{MemoryLimit: *memLimit << 20}}
	if *on {
		limit := inflight.Below(*maxInFlight)
		ctl, err := admission.New(admission.Rules{
			"work": admission.Predicate(func(ctx context.Context, class string, n *fabric.Node) (bool, error) {
				if n.Pressure().Reason == fabric.PressureMemory {
					return false, nil
				}
				return limit(ctx, class, n)
			}),
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "rpc-server:", err)
			return 1
		}
		cfg.BeforeExecute = ctl.BeforeExecute(func(call *fabric.Call) string {
			if call.Path == "bench/work" {
				return "work"
			}
			return ""
		})
	}
	cfg.Limits = fabric.Limits{RPCRate: -1, FrameRate: -1, ByteRate: -1} // the load is the point
	node, err := fabric.NewNode(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "rpc-server:", err)
		return 1
	}
	defer node.Close()
	iters := calibrate(*work)
	node.HandleRPC("bench/work", inflight.Wrap(func(context.Context, *fabric.Call) (any, error) {
		return burn(iters), nil
	}))
	edge, err := wsedge.New(node, wsedge.Options{AllowedOrigins: []string{"*"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "rpc-server:", err)
		return 1
	}
	defer edge.Close()
	mux := http.NewServeMux()
	mux.Handle("/ws", edge)
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(rpcServerStats{Pressure: node.Pressure(), InFlight: inflight.Count()})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "rpc-server:", err)
		return 1
	}
	hs := &http.Server{Handler: mux}
	go func() { _ = hs.Serve(ln) }()
	defer hs.Close()
	fmt.Printf("http://%s\n", ln.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin) // until the coordinator closes stdin
	return 0
}

// burn hashes iters times: the CPU work of one call.
func burn(iters int) string {
	var sum [32]byte
	for range iters {
		sum = sha256.Sum256(sum[:])
	}
	return fmt.Sprintf("%x", sum[:4])
}

// calibrate returns the iterations of burn that take d on this machine
// (the fastest of a few tries: the machine may be busy).
func calibrate(d time.Duration) int {
	const probe = 20_000
	best := time.Duration(1<<63 - 1)
	for range 5 {
		t := time.Now()
		burn(probe)
		best = min(best, time.Since(t))
	}
	return max(1, int(float64(probe)*float64(d)/float64(best)))
}
