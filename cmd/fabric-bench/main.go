// Command fabric-bench is Fabric's load tool. It opens many WebSocket
// connections (in worker processes, spreading client addresses over
// 127.0.0.x), subscribes them, publishes at a target rate, and reports
// deliveries/s, publish→deliver latency percentiles, handshake rate, drops,
// and the server's and its own RSS and CPU (read from /proc).
//
//	fabric-bench --scenario broadcast --serve
//	fabric-bench --scenario fanout-many-topics --url ws://127.0.0.1:8080/ws --server-pid 1234
//	fabric-bench --target centrifugo --spawn ~/.cache/fabric-bench-peers/bin/centrifugo
//	fabric-bench --target nats-ws --spawn ~/.cache/fabric-bench-peers/bin/natsws
//
// Scenarios: broadcast, fanout-many-topics, idle, churn, cross-instance,
// rpc-overload (overload.go). Targets (wire.go, peers.go): fabric, and the
// peers it is compared with, centrifugo and nats-ws (bench/peers.sh
// installs them). Every run is bounded in time and count and stops by
// itself.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// options are fabric-bench's flags.
type options struct {
	Scenario    string
	Target      string
	APIKey      string
	CentPool    bool
	Floor       bool
	URL         string
	PublishURL  string
	Serve       bool
	Spawn       string
	ServerPID   int
	ServerWork  int
	Conns       int
	Shared      int
	Rate        float64
	Publishers  int
	Payload     int
	Duration    time.Duration
	Warmup      time.Duration
	Drain       time.Duration
	Via         string
	Procs       int
	Concurrency int
	SourceIPs   int
	JSON        bool
	Quiet       bool
	GoroutineRd bool
	ReadBatch   time.Duration
	CPUProfile  string

	// rpc-overload (overload.go).
	Admission      string
	Work           time.Duration
	Overload       float64
	MaxInFlight    int
	MemoryLimitMiB int64
}

// scenarioDefaults are each scenario's reproducible settings; flags given
// explicitly override them.
var scenarioDefaults = map[string]options{
	"broadcast":          {Conns: 10_000, Rate: 100, Publishers: 1, Payload: 128, Duration: 10 * time.Second, Warmup: 2 * time.Second},
	"fanout-many-topics": {Conns: 10_000, Shared: 100, Rate: 20_000, Publishers: 4, Payload: 128, Duration: 10 * time.Second, Warmup: 2 * time.Second},
	"idle":               {Conns: 18_000, Duration: 5 * time.Second},
	"churn":              {Conns: 0, Duration: 10 * time.Second, Concurrency: 64},
	"cross-instance":     {Conns: 10_000, Rate: 100, Publishers: 1, Payload: 128, Duration: 10 * time.Second, Warmup: 2 * time.Second},
	"rpc-overload":       {Conns: 64, Duration: 10 * time.Second},
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "worker" {
		os.Exit(runWorker())
	}
	if len(os.Args) > 1 && os.Args[1] == "rpc-server" {
		os.Exit(runRPCServer(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "table" {
		os.Exit(runTable(os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	var o options
	fs := flag.NewFlagSet("fabric-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.Scenario, "scenario", "broadcast", "broadcast, fanout-many-topics, idle, churn, cross-instance or rpc-overload")
	fs.StringVar(&o.Target, "target", targetFabric, "system under test: fabric, centrifugo (its JSON protocol and HTTP API) or nats-ws (NATS's WebSocket listener)")
	fs.StringVar(&o.APIKey, "api-key", "fabric-bench", "centrifugo: the HTTP API key (--spawn configures it)")
	fs.BoolVar(&o.CentPool, "centrifugo-write-buffer-pool", false, "centrifugo with --spawn: websocket.use_write_buffer_pool (its memory option for connections that write little)")
	fs.BoolVar(&o.Floor, "floor", true, "broadcast: measure the loopback write cost first and report the latency floor and p99 ÷ floor")
	fs.StringVar(&o.URL, "url", "", "WebSocket endpoint of the server under test (default: the --serve/--spawn server)")
	fs.StringVar(&o.PublishURL, "publish-url", "", "HTTP base URL to publish to with --via http (default: the --url host; for cross-instance the other instance)")
	fs.BoolVar(&o.Serve, "serve", false, "run the server under test inside this process (embedded NATS); enables --via inproc")
	fs.StringVar(&o.Spawn, "spawn", "", "path of a fabric binary to start as the server under test (its RSS/CPU are measured)")
	fs.IntVar(&o.ServerPID, "server-pid", 0, "pid of an already running server, for RSS/CPU readings (summed over it and its child processes: a primary and its workers)")
	fs.IntVar(&o.ServerWork, "server-workers", 0, "with --spawn (fabric): fabric serve --workers N (worker mode: N processes on one port)")
	fs.IntVar(&o.Conns, "conns", 0, "WebSocket connections (scenario default)")
	fs.IntVar(&o.Shared, "shared", 0, "shared topics (fanout-many-topics)")
	fs.Float64Var(&o.Rate, "rate", 0, "publishes per second, all publishers together")
	fs.IntVar(&o.Publishers, "publishers", 0, "publisher goroutines")
	fs.IntVar(&o.Payload, "payload", 0, "bytes of data per message, timestamp included")
	fs.DurationVar(&o.Duration, "duration", 0, "measured time")
	fs.DurationVar(&o.Warmup, "warmup", -1, "publishing time before measuring")
	fs.DurationVar(&o.Drain, "drain", 3*time.Second, "wait after publishing for deliveries in flight")
	fs.StringVar(&o.Via, "via", "", "publish through inproc (fabric --serve), http (fabric, centrifugo), nats (nats-ws: a NATS client connection) or rpc (over a WebSocket: fabric/publish, Centrifugo's publish command, NATS PUB) (default: inproc with --serve, nats for nats-ws, else http)")
	fs.IntVar(&o.Procs, "procs", 0, "worker processes (default: one per 15,000 connections)")
	fs.IntVar(&o.Concurrency, "concurrency", 0, "dials in flight per worker (churn: dial loops per worker)")
	fs.IntVar(&o.SourceIPs, "source-ips", 250, "spread client addresses over this many 127.0.x.y addresses")
	fs.BoolVar(&o.JSON, "json", false, "print the result as JSON")
	fs.BoolVar(&o.Quiet, "quiet", false, "no progress line")
	fs.DurationVar(&o.ReadBatch, "read-batch", 0, "workers poll their epoll sets this often instead of sleeping in epoll_wait (0: block); see docs/benchmarks.md")
	fs.BoolVar(&o.GoroutineRd, "goroutine-per-conn", false, "with --serve/--spawn: read connections with a goroutine each instead of epoll")
	fs.StringVar(&o.CPUProfile, "cpuprofile", "", "with --serve: write a CPU profile of the measured window here")
	fs.StringVar(&o.Admission, "admission", "both", "rpc-overload: admission control on, off, or both (one run each)")
	fs.DurationVar(&o.Work, "work", 2*time.Millisecond, "rpc-overload: CPU time of one bench/work call")
	fs.Float64Var(&o.Overload, "overload", 3, "rpc-overload: offered rate as a multiple of the measured capacity")
	fs.IntVar(&o.MaxInFlight, "max-in-flight", max(1, runtime.NumCPU()-1), "rpc-overload: bench/work calls running at once before OVERLOADED (admission on; default: a core is left for I/O)")
	fs.Int64Var(&o.MemoryLimitMiB, "memory-limit-mib", 512, "rpc-overload: the server's MEMORY pressure limit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	def, ok := scenarioDefaults[o.Scenario]
	if !ok {
		fmt.Fprintf(stderr, "fabric-bench: unknown scenario %q\n", o.Scenario)
		return 2
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	fill := func(name string, dst *int, v int) {
		if !set[name] {
			*dst = v
		}
	}
	fill("conns", &o.Conns, def.Conns)
	fill("shared", &o.Shared, max(def.Shared, 1))
	fill("publishers", &o.Publishers, max(def.Publishers, 1))
	fill("payload", &o.Payload, def.Payload)
	fill("concurrency", &o.Concurrency, max(def.Concurrency, 200))
	if !set["rate"] {
		o.Rate = def.Rate
	}
	if !set["duration"] {
		o.Duration = def.Duration
	}
	if !set["warmup"] {
		o.Warmup = def.Warmup
	}
	switch o.Target {
	case targetFabric, targetCentrifugo, targetNATS:
	default:
		fmt.Fprintf(stderr, "fabric-bench: unknown target %q\n", o.Target)
		return 2
	}
	if o.Target != targetFabric && (o.Serve || o.Scenario == "cross-instance" || o.Scenario == "rpc-overload" || o.GoroutineRd) {
		fmt.Fprintf(stderr, "fabric-bench: --target %s runs broadcast, fanout-many-topics, idle and churn against --spawn or --url (no --serve, --goroutine-per-conn)\n", o.Target)
		return 2
	}
	if o.Via == "" {
		switch {
		case o.Serve:
			o.Via = "inproc"
		case o.Target == targetNATS:
			o.Via = "nats"
		default:
			o.Via = "http"
		}
	}
	if (o.Via == "nats") != (o.Target == targetNATS && o.Via != "rpc") {
		fmt.Fprintf(stderr, "fabric-bench: --via %s does not apply to --target %s\n", o.Via, o.Target)
		return 2
	}
	if o.Procs <= 0 {
		o.Procs = max(1, (o.Conns+14_999)/15_000)
	}
	if o.Scenario == "rpc-overload" {
		return runRPCOverload(o, stdout, stderr)
	}
	res, err := bench(o, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "fabric-bench:", err)
		return 1
	}
	if o.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
	} else {
		res.print(stdout)
	}
	return 0
}

// result is what a run measured.
type result struct {
	Scenario       string  `json:"scenario"`
	Target         string  `json:"target"`
	Options        string  `json:"options,omitempty"`
	Via            string  `json:"via,omitempty"`
	Conns          int     `json:"conns"`
	ConnectFailed  int     `json:"connect_failed"`
	HandshakesPerS float64 `json:"handshakes_per_s"`
	Publishes      uint64  `json:"publishes"`
	PublishErrors  uint64  `json:"publish_errors"`
	PublishRate    float64 `json:"publishes_per_s"`
	Deliveries     uint64  `json:"deliveries"`
	DeliveriesPerS float64 `json:"deliveries_per_s"`
	Expected       uint64  `json:"expected_deliveries_whole_run"`
	Missing        int64   `json:"missing_deliveries_whole_run"`
	Latency        latency `json:"latency"`
	ServerRSSMiB   float64 `json:"server_rss_mib"`
	ServerBaseMiB  float64 `json:"server_baseline_rss_mib"`
	RSSPerConnKiB  float64 `json:"server_rss_per_conn_kib,omitempty"`
	ServerCPU      float64 `json:"server_cpu_percent"`
	ServerProcs    int     `json:"server_processes,omitempty"`
	KernelTCPMiB   float64 `json:"kernel_tcp_mem_mib,omitempty"`
	KernelTCPBase  float64 `json:"kernel_tcp_mem_baseline_mib,omitempty"`
	KernelTCPConns int     `json:"kernel_tcp_sockets,omitempty"`
	KernelSlabMiB  float64 `json:"kernel_slab_mib,omitempty"`
	KernelSlabBase float64 `json:"kernel_slab_baseline_mib,omitempty"`
	ToolCPU        float64 `json:"tool_cpu_percent"`
	ToolRSSMiB     float64 `json:"tool_rss_mib"`
	Duration       float64 `json:"duration_s"`
	Cores          int     `json:"cores"`
	Floor          *floor  `json:"floor,omitempty"`
	Load           string  `json:"load_average,omitempty"`
	Date           string  `json:"date"`
	Command        string  `json:"command"`
}

func (r *result) print(w io.Writer) {
	fmt.Fprintf(w, "\n%s on %s: %d connections (%d failed), %d cores, %s, load average %s\n", r.Scenario, r.Target, r.Conns, r.ConnectFailed, r.Cores, r.Date, r.Load)
	fmt.Fprintf(w, "  handshakes      %.0f/s\n", r.HandshakesPerS)
	if r.Publishes > 0 {
		fmt.Fprintf(w, "  publishes       %d (%.0f/s), %d errors\n", r.Publishes, r.PublishRate, r.PublishErrors)
		fmt.Fprintf(w, "  deliveries      %d in the window (%.0f/s); whole run: expected %d, missing %d\n", r.Deliveries, r.DeliveriesPerS, r.Expected, r.Missing)
		fmt.Fprintf(w, "  latency         p50 %.2fms  p95 %.2fms  p99 %.2fms  max %.2fms  (%d samples)\n",
			r.Latency.P50, r.Latency.P95, r.Latency.P99, r.Latency.Max, r.Latency.Count)
	}
	if r.RSSPerConnKiB > 0 {
		fmt.Fprintf(w, "  server RSS      %.1f MiB (baseline %.1f MiB): %.2f KiB per connection\n", r.ServerRSSMiB, r.ServerBaseMiB, r.RSSPerConnKiB)
	} else if r.ServerRSSMiB > 0 {
		fmt.Fprintf(w, "  server RSS      %.1f MiB\n", r.ServerRSSMiB)
	}
	fmt.Fprintf(w, "  server CPU      %.0f%% of a core\n", r.ServerCPU)
	if r.ServerProcs > 1 {
		fmt.Fprintf(w, "  server procs    %d (RSS and CPU summed over them)\n", r.ServerProcs)
	}
	if r.KernelTCPConns > 0 {
		fmt.Fprintf(w, "  kernel          TCP buffers %.1f MiB (baseline %.1f), slab %.1f MiB (baseline %.1f), %d TCP sockets on the machine\n",
			r.KernelTCPMiB, r.KernelTCPBase, r.KernelSlabMiB, r.KernelSlabBase, r.KernelTCPConns)
	}
	fmt.Fprintf(w, "  load tool       %.0f%% of a core, %.1f MiB RSS\n", r.ToolCPU, r.ToolRSSMiB)
	if f := r.Floor; f != nil {
		fmt.Fprintf(w, "  floor           %.0f ns per %d-byte loopback write; %d writes ÷ %.2f cores left by the tool = %.1f ms; p99 ÷ floor = %.2f\n",
			f.WriteNS, f.FrameBytes, f.Subscribers, f.ServerCores, f.FloorMS, f.P99Ratio)
	}
}

// workerProc is one spawned worker.
type workerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan workerReport
	last  atomic.Pointer[workerReport]
	final chan workerReport
}

func bench(o options, stderr io.Writer) (*result, error) {
	res := &result{Scenario: o.Scenario, Target: o.Target, Via: o.Via, Cores: runtime.NumCPU(), Command: strings.Join(os.Args, " "),
		Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), Load: loadAverage()}
	if o.Scenario == "churn" || o.Scenario == "idle" {
		res.Via = ""
	}
	if o.Target == targetCentrifugo && o.CentPool {
		res.Options = "use_write_buffer_pool"
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var srv *inprocServer
	var spawned []*exec.Cmd
	var peerDir string
	var dataDirs []string // spawned fabric servers' --data
	defer func() {
		for _, c := range spawned {
			stopProcess(c)
		}
		for _, d := range dataDirs {
			os.RemoveAll(d)
		}
		if peerDir != "" {
			os.RemoveAll(peerDir)
		}
		if srv != nil {
			srv.close()
		}
	}()
	publishBase := o.PublishURL
	switch {
	case o.Serve:
		var err error
		srv, err = startInproc(ctx, o.Scenario == "cross-instance", o.GoroutineRd)
		if err != nil {
			return nil, err
		}
		if o.URL == "" {
			o.URL = srv.subURL
		}
		if publishBase == "" {
			publishBase = srv.pubHTTP
		}
		o.ServerPID = os.Getpid()
	case o.Spawn != "" && o.Target != targetFabric:
		cmd, dir, sub, pub, err := spawnPeer(o)
		peerDir = dir
		if cmd != nil {
			spawned = append(spawned, cmd)
		}
		if err != nil {
			return nil, err
		}
		if o.URL == "" {
			o.URL = sub
		}
		if publishBase == "" {
			publishBase = pub
		}
		o.ServerPID = cmd.Process.Pid
	case o.Spawn != "":
		cmds, dirs, sub, pub, err := spawnServers(o)
		spawned, dataDirs = cmds, dirs
		if err != nil {
			return nil, err
		}
		if o.URL == "" {
			o.URL = sub
		}
		if publishBase == "" {
			publishBase = pub
		}
		o.ServerPID = cmds[len(cmds)-1].Process.Pid
	}
	if o.URL == "" {
		o.URL = defaultURL(o.Target)
	}
	if publishBase == "" {
		if o.Target == targetNATS && o.Via == "nats" {
			return nil, errors.New("--target nats-ws --url needs --publish-url nats://host:port (the server's client port)")
		}
		u, _ := url.Parse(o.URL)
		publishBase = "http://" + u.Host
	}
	if o.Via == "inproc" && srv == nil {
		return nil, errors.New("--via inproc needs --serve")
	}
	if o.Floor && o.Scenario == "broadcast" {
		// Before any client connects: the machine's cost of one write.
		wns, err := measureWriteCost(floorFrame, floorPairs, floorWrites)
		if err != nil {
			return nil, fmt.Errorf("floor: %w", err)
		}
		res.Floor = &floor{WriteNS: wns, FrameBytes: floorFrame}
		if !o.Quiet {
			fmt.Fprintf(stderr, "floor: %.0f ns per %d-byte loopback write\n", wns, floorFrame)
		}
	}
	runtime.GC()
	base := serverSample(o)
	res.ServerBaseMiB = mib(base.rss)
	kb, _ := kernelTCPMem()
	res.KernelTCPBase = mib(kb)
	res.KernelSlabBase = mib(kernelSlab())

	// Workers.
	churn := time.Duration(0)
	if o.Scenario == "churn" {
		churn = o.Duration
		o.Conns = 0
	}
	workers, err := startWorkers(o, churn)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, w := range workers {
			_ = w.stdin.Close()
			_ = w.cmd.Wait()
		}
	}()
	toolStart := toolSample(workers)
	if churn > 0 {
		if o.CPUProfile != "" {
			f, err := os.Create(o.CPUProfile)
			if err != nil {
				return nil, err
			}
			_ = pprof.StartCPUProfile(f)
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
		return runChurn(o, res, workers, base, toolStart)
	}
	connStart := time.Now()
	for _, w := range workers {
		r, ok := <-w.lines
		if !ok || r.Type != "ready" {
			return nil, fmt.Errorf("worker failed to start: %+v", r)
		}
		res.Conns += r.Conns
		res.ConnectFailed += r.Failed
	}
	res.HandshakesPerS = float64(res.Conns) / time.Since(connStart).Seconds()
	if !o.Quiet {
		fmt.Fprintf(stderr, "connected %d (%d failed) at %.0f handshakes/s\n", res.Conns, res.ConnectFailed, res.HandshakesPerS)
	}
	if o.Scenario == "idle" {
		return runIdle(o, res, workers, base, toolStart, stderr)
	}

	// Publish, measure, drain.
	pub := newPublisher(o, srv, publishBase, res.Conns)
	pubCtx, stopPub := context.WithCancel(ctx)
	defer stopPub()
	var pubWG sync.WaitGroup
	pubWG.Go(func() { pub.run(pubCtx) })
	deadline := time.Now().Add(o.Warmup)
	progress(o, stderr, workers, pub, deadline, base)
	h0, r0, err := sample(workers)
	if err != nil {
		return nil, err
	}
	p0 := pub.published.Load()
	s0 := serverSample(o)
	if o.CPUProfile != "" {
		f, err := os.Create(o.CPUProfile)
		if err != nil {
			return nil, err
		}
		_ = pprof.StartCPUProfile(f)
		defer f.Close()
	}
	t0 := time.Now()
	progress(o, stderr, workers, pub, t0.Add(o.Duration), base)
	h1, r1, err := sample(workers)
	if err != nil {
		return nil, err
	}
	p1 := pub.published.Load()
	elapsed := time.Since(t0)
	if o.CPUProfile != "" {
		pprof.StopCPUProfile()
	}
	s1 := serverSample(o)
	stopPub()
	pubWG.Wait()
	time.Sleep(o.Drain)
	_, rAll, err := sample(workers)
	if err != nil {
		return nil, err
	}
	toolEnd := toolSample(workers)

	res.Duration = elapsed.Seconds()
	res.Publishes = p1 - p0
	res.PublishErrors = pub.errors.Load()
	res.PublishRate = float64(res.Publishes) / elapsed.Seconds()
	res.Deliveries = r1 - r0
	res.DeliveriesPerS = float64(res.Deliveries) / elapsed.Seconds()
	// Losses are counted over the whole run, so that nothing in flight at a
	// window boundary looks lost.
	res.Expected = pub.expected.Load()
	res.Missing = int64(res.Expected) - int64(rAll)
	res.Latency = summarize(subCounts(h1, h0))
	res.ServerRSSMiB = mib(s1.rss)
	res.ServerCPU = cpuPercent(s0, s1)
	res.kernelAndProcs(o)
	if res.Conns > 0 && s1.rss > 0 && o.Scenario == "broadcast" {
		// With traffic: queued frames count too (idle measures without).
		res.RSSPerConnKiB = math.Round(float64(s1.rss-base.rss)/float64(res.Conns)/1024*100) / 100
	}
	res.ToolCPU, res.ToolRSSMiB = toolUsage(toolStart, toolEnd)
	if srv != nil { // the server shares this process: do not count it as the tool
		res.ToolCPU -= cpuPercent(base, s1)
	}
	if res.Floor != nil {
		res.Floor.complete(res)
	}
	return res, nil
}

// serverSample reads the server's RSS and CPU: the process tree of
// --server-pid or the spawned server (a worker-mode primary and its
// workers), or this process with --serve.
func serverSample(o options) procSample {
	if o.Serve {
		return readProc(o.ServerPID)
	}
	s, _ := readTree(o.ServerPID)
	return s
}

// kernelAndProcs records the kernel's TCP memory (the whole machine's, from
// /proc/net/sockstat) and how many processes the server is.
func (r *result) kernelAndProcs(o options) {
	b, n := kernelTCPMem()
	r.KernelTCPMiB, r.KernelTCPConns = mib(b), n
	r.KernelSlabMiB = mib(kernelSlab())
	if !o.Serve {
		_, r.ServerProcs = readTree(o.ServerPID)
	}
}

func mib(b int64) float64 { return math.Round(float64(b)/(1<<20)*10) / 10 }

// progress prints a line a second until deadline.
func progress(o options, w io.Writer, workers []*workerProc, pub *publisher, deadline time.Time, base procSample) {
	last := time.Now()
	_, lastRecv := collect(workers)
	lastPub := pub.published.Load()
	lastProc := serverSample(o)
	for time.Now().Before(deadline) {
		time.Sleep(min(time.Second, time.Until(deadline)))
		if o.Quiet {
			continue
		}
		now := time.Now()
		h, recv := collect(workers)
		p := pub.published.Load()
		pr := serverSample(o)
		dt := now.Sub(last).Seconds()
		l := summarize(h)
		fmt.Fprintf(w, "\r%6.1fs  pub %7.0f/s  deliver %9.0f/s  p99(all) %6.2fms  server %6.1f MiB %4.0f%% CPU   ",
			time.Until(deadline).Seconds(), float64(p-lastPub)/dt, float64(recv-lastRecv)/dt, l.P99, mib(pr.rss), cpuPercent(lastProc, pr))
		last, lastRecv, lastPub, lastProc = now, recv, p, pr
	}
	if !o.Quiet {
		fmt.Fprintln(w)
	}
}

// sample asks every worker for its stats now and sums them.
func sample(workers []*workerProc) ([]uint64, uint64, error) {
	for _, w := range workers {
		if _, err := io.WriteString(w.stdin, "sample\n"); err != nil {
			return nil, 0, err
		}
	}
	h := make([]uint64, histBuckets)
	var n uint64
	for _, w := range workers {
		select {
		case r, ok := <-w.lines:
			if !ok || r.Type != "sample" {
				return nil, 0, fmt.Errorf("worker answered %+v", r)
			}
			addCounts(h, r.Hist)
			n += r.Received
		case <-time.After(10 * time.Second):
			return nil, 0, errors.New("worker did not answer a sample request")
		}
	}
	return h, n, nil
}

// collect sums the latest periodic stats of every worker (for progress).
func collect(workers []*workerProc) ([]uint64, uint64) {
	h := make([]uint64, histBuckets)
	var n uint64
	for _, w := range workers {
		if r := w.last.Load(); r != nil {
			if len(r.Hist) == histBuckets {
				addCounts(h, r.Hist)
			}
			n += r.Received
		}
	}
	return h, n
}

func runIdle(o options, res *result, workers []*workerProc, base, toolStart procSample, stderr io.Writer) (*result, error) {
	if !o.Quiet {
		fmt.Fprintf(stderr, "idle for %s, then reading server RSS\n", o.Duration)
	}
	time.Sleep(o.Duration)
	s := serverSample(o)
	res.ServerRSSMiB = mib(s.rss)
	res.kernelAndProcs(o)
	if res.Conns > 0 && s.rss > 0 {
		res.RSSPerConnKiB = math.Round(float64(s.rss-base.rss)/float64(res.Conns)/1024*100) / 100
	}
	res.ServerCPU = cpuPercent(base, s)
	res.Duration = o.Duration.Seconds()
	res.ToolCPU, res.ToolRSSMiB = toolUsage(toolStart, toolSample(workers))
	return res, nil
}

func runChurn(o options, res *result, workers []*workerProc, base, toolStart procSample) (*result, error) {
	start := time.Now()
	h := make([]uint64, histBuckets)
	for _, w := range workers {
		for r := range w.lines {
			if r.Type == "final" {
				res.Conns += int(r.Handshakes)
				res.ConnectFailed += r.Failed
				if len(r.Hist) == histBuckets {
					addCounts(h, r.Hist)
				}
				break
			}
		}
	}
	el := time.Since(start)
	s := serverSample(o)
	res.Duration = el.Seconds()
	res.HandshakesPerS = float64(res.Conns) / el.Seconds()
	res.Latency = summarize(h)
	res.ServerRSSMiB = mib(s.rss)
	res.ServerCPU = cpuPercent(base, s)
	res.ToolCPU, res.ToolRSSMiB = toolUsage(toolStart, toolSample(workers))
	return res, nil
}

// startWorkers spawns o.Procs copies of this binary in worker mode.
func startWorkers(o options, churn time.Duration) ([]*workerProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	per := (o.Conns + o.Procs - 1) / o.Procs
	var out []*workerProc
	for i := range o.Procs {
		n := min(per, o.Conns-i*per)
		if churn == 0 && n <= 0 {
			break
		}
		cfg := workerConfig{URL: o.URL, Conns: max(n, 0), Offset: i * per, Scenario: o.Scenario, Shared: o.Shared,
			Concurrency: o.Concurrency, SourceIPs: o.SourceIPs, Churn: churn, ReadBatch: o.ReadBatch, Target: o.Target}
		if churn > 0 {
			cfg.Offset = i * 1_000_000
		}
		cmd := exec.Command(self, "worker")
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
		w := &workerProc{cmd: cmd, stdin: stdin, lines: make(chan workerReport, 16)}
		b, _ := json.Marshal(cfg)
		if _, err := stdin.Write(append(b, '\n')); err != nil {
			return nil, err
		}
		go func() {
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 1<<20), 1<<22)
			for sc.Scan() {
				var r workerReport
				if json.Unmarshal(sc.Bytes(), &r) != nil {
					continue
				}
				if r.Type == "stats" || r.Type == "final" {
					w.last.Store(&r)
				}
				if r.Type != "stats" {
					w.lines <- r // ready, sample, final, error
				}
			}
			close(w.lines)
		}()
		out = append(out, w)
	}
	return out, nil
}

// toolSample sums this process's and its workers' CPU and RSS.
func toolSample(workers []*workerProc) procSample {
	s := readProc(os.Getpid())
	for _, w := range workers {
		ws := readProc(w.cmd.Process.Pid)
		s.cpu += ws.cpu
		s.rss += ws.rss
	}
	return s
}

func toolUsage(a, b procSample) (float64, float64) {
	return math.Round(cpuPercent(a, b)), mib(b.rss)
}

// spawnServers starts `fabric serve` (two clustered instances for
// cross-instance) and returns the subscribe URL and publish base URL.
func spawnServers(o options) (cmds []*exec.Cmd, dirs []string, sub, pub string, err error) {
	n := 1
	if o.Scenario == "cross-instance" {
		n = 2
	}
	httpAddrs, clusterAddrs := make([]string, n), make([]string, n)
	var routes []string
	for i := range n {
		httpAddrs[i] = freeAddr()
		clusterAddrs[i] = freeAddr()
		routes = append(routes, "nats://"+clusterAddrs[i])
	}
	for i := range n {
		dir, err := os.MkdirTemp("", "fabric-bench-data")
		if err != nil {
			return cmds, dirs, "", "", err
		}
		dirs = append(dirs, dir)
		// Load-tool connections publish and read far past the per-connection
		// limits a public server keeps: lift them.
		args := []string{"serve", "--listen", httpAddrs[i], "--data", dir, "--log-level", "warn", "--client-publish", "bench:*",
			"--rpc-rate", "-1", "--frame-rate", "-1", "--byte-rate", "-1"}
		if n > 1 {
			args = append(args, "--cluster-listen", clusterAddrs[i], "--routes", strings.Join(routes, ","), "--name", "bench-"+strconv.Itoa(i))
		}
		if o.GoroutineRd {
			args = append(args, "--goroutine-per-conn")
		}
		if o.ServerWork > 0 {
			args = append(args, "--workers", strconv.Itoa(o.ServerWork))
		}
		cmd := exec.Command(o.Spawn, args...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return cmds, dirs, "", "", err
		}
		cmds = append(cmds, cmd)
	}
	for _, a := range httpAddrs {
		if err := waitReady("http://"+a, 60*time.Second); err != nil {
			return cmds, dirs, "", "", err
		}
	}
	return cmds, dirs, "ws://" + httpAddrs[n-1] + "/ws", "http://" + httpAddrs[0], nil
}

func waitReady(base string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		resp, err := http.Get(base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s", base, d)
}

// publisher publishes benchmark messages at a steady total rate.
type publisher struct {
	o         options
	srv       *inprocServer
	base      string
	conns     int
	published atomic.Uint64
	expected  atomic.Uint64
	errors    atomic.Uint64
}

func newPublisher(o options, srv *inprocServer, base string, conns int) *publisher {
	return &publisher{o: o, srv: srv, base: base, conns: conns}
}

// pick returns the next topic and how many connections subscribe to it.
func (p *publisher) pick(r *rand.Rand) (string, int) {
	if p.o.Scenario != "fanout-many-topics" {
		return "bench:b", p.conns
	}
	k := r.IntN(p.conns + p.o.Shared)
	if k < p.conns {
		return "bench:t:" + strconv.Itoa(k), 1
	}
	s := k - p.conns
	n := p.conns / p.o.Shared
	if s < p.conns%p.o.Shared {
		n++
	}
	return "bench:s:" + strconv.Itoa(s), n
}

// data is {"ts":<unix ns>,"p":"xxx…"} padded to the payload size.
func (p *publisher) data(buf []byte) []byte {
	buf = append(buf[:0], `{"ts":`...)
	buf = strconv.AppendInt(buf, time.Now().UnixNano(), 10)
	buf = append(buf, `,"p":"`...)
	for len(buf) < p.o.Payload-2 {
		buf = append(buf, 'x')
	}
	return append(buf, `"}`...)
}

func (p *publisher) run(ctx context.Context) {
	var wg sync.WaitGroup
	per := p.o.Rate / float64(p.o.Publishers)
	for g := range p.o.Publishers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 42))
			send := p.sender()
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			start := time.Now()
			var sent float64
			buf := make([]byte, 0, p.o.Payload+64)
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-tick.C:
					due := per * now.Sub(start).Seconds()
					for ; sent < due; sent++ {
						topic, subs := p.pick(r)
						buf = p.data(buf)
						if err := send(ctx, topic, buf); err != nil {
							if ctx.Err() != nil {
								return
							}
							p.errors.Add(1)
							continue
						}
						p.published.Add(1)
						p.expected.Add(uint64(subs))
					}
				}
			}
		})
	}
	wg.Wait()
}

func (p *publisher) sender() func(ctx context.Context, topic string, data []byte) error {
	switch {
	case p.o.Target == targetCentrifugo && p.o.Via == "rpc":
		return centrifugoWSSender(p.base, p.errors.Add)
	case p.o.Target == targetCentrifugo:
		return centrifugoHTTPSender(p.base, p.o.APIKey)
	case p.o.Target == targetNATS && p.o.Via == "rpc":
		return natsWSSender(p.o.URL)
	case p.o.Target == targetNATS:
		return natsSender(p.base)
	}
	switch p.o.Via {
	case "inproc":
		return func(ctx context.Context, topic string, data []byte) error {
			_, err := p.srv.pub.Publish(ctx, topic, "tick", json.RawMessage(data))
			return err
		}
	case "rpc": // fire-and-forget fabric/publish calls over one WebSocket per publisher
		wsURL := "ws" + strings.TrimPrefix(p.base, "http") + "/ws"
		c, err := wsclient.Dial(context.Background(), wsURL, wsclient.Options{})
		if err != nil {
			return func(context.Context, string, []byte) error { return err }
		}
		var frame []byte
		return func(ctx context.Context, topic string, data []byte) error {
			frame = append(frame[:0], `{"rpc":"fabric/publish","args":["`...)
			frame = append(frame, topic...)
			frame = append(frame, `","tick",`...)
			frame = append(frame, data...)
			frame = append(frame, "]}"...)
			return c.SendRaw(frame)
		}
	default: // http
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 10 * time.Second}
		var body bytes.Buffer
		return func(ctx context.Context, topic string, data []byte) error {
			body.Reset()
			body.WriteString(`{"topic":"`)
			body.WriteString(topic)
			body.WriteString(`","event":"tick","data":`)
			body.Write(data)
			body.WriteByte('}')
			// Not cancelled mid-flight: a request the server took must be counted.
			req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, p.base+"/api/publish", bytes.NewReader(body.Bytes()))
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				return err
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return fmt.Errorf("publish: %s", resp.Status)
			}
			return nil
		}
	}
}
