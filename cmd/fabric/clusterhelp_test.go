package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// Helpers of the cluster, failover and worker tests: members of a cluster
// of `fabric serve` processes that can be killed and restarted on their
// data dirs and ports, a rate-paced publisher that records what was
// acknowledged, and subscribers that record every seq they receive.

// chaos reports whether the long versions run (make chaos sets
// FABRIC_CHAOS=1).
func chaos() bool { return os.Getenv("FABRIC_CHAOS") == "1" }

var (
	fastBinOnce sync.Once
	fastBin     string
	fastBinErr  error
)

// serverBinary is the binary the cluster tests run: the race-enabled one of
// TestMain, or in the long versions (FABRIC_CHAOS=1) one built without the
// race detector, so that 1,000 clients at 1,000 messages a second measure
// Fabric rather than the detector.
func serverBinary(t *testing.T) string {
	if !chaos() || os.Getenv("FABRIC_CHAOS_RACE") == "1" {
		return fabricBin
	}
	fastBinOnce.Do(func() {
		fastBin = filepath.Join(filepath.Dir(fabricBin), "fabric-norace")
		out, err := exec.Command("go", "build", "-o", fastBin, ".").CombinedOutput()
		if err != nil {
			fastBinErr = fmt.Errorf("build fabric without -race: %v\n%s", err, out)
		}
	})
	if fastBinErr != nil {
		t.Fatal(fastBinErr)
	}
	return fastBin
}

// launchBin starts bin serve with args (the caller gives --listen and
// --data); the process is killed at cleanup if still running.
func launchBin(t *testing.T, bin, addr string, args ...string) *proc {
	t.Helper()
	args = append([]string{"serve", "--listen", addr, "--log-level", "warn"}, args...)
	p := &proc{cmd: exec.Command(bin, args...), addr: addr, out: &syncBuffer{}, done: make(chan error, 1), exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.done <- p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

// member is one instance of a test cluster: fixed ports and data dir, so
// that it restarts as itself.
type member struct {
	i                                  int
	name, http, cluster, nats, monitor string
	data                               string
	args                               []string
	bin                                string
	p                                  *proc
}

// newMembers prepares n members routed to each other (not started). Every
// port is chosen up front and distinct.
func newMembers(t *testing.T, n int, extra ...string) []*member {
	t.Helper()
	ports := fabrictest.FreeAddrs(t, 4*n)
	var routes []string
	for i := range n {
		routes = append(routes, "nats://"+ports[n+i])
	}
	bin := serverBinary(t)
	ms := make([]*member, n)
	for i := range ms {
		m := &member{i: i, name: fmt.Sprintf("m%d", i), http: ports[i], cluster: ports[n+i], nats: ports[2*n+i],
			monitor: ports[3*n+i], data: t.TempDir(), bin: bin}
		m.args = append([]string{"--name", m.name, "--data", m.data, "--cluster-listen", m.cluster,
			"--routes", strings.Join(routes, ","), "--nats-listen", m.nats, "--nats-monitor", m.monitor}, extra...)
		ms[i] = m
	}
	return ms
}

func (m *member) launch(t *testing.T) {
	t.Helper()
	m.p = launchBin(t, m.bin, m.http, m.args...)
}

// readyz returns /readyz's status and body.
func readyz(addr string) (int, map[string]any) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body
}

func (m *member) waitReady(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	var body map[string]any
	for {
		var status int
		if status, body = readyz(m.http); status == http.StatusOK {
			return
		}
		select {
		case <-m.p.exited:
			t.Fatalf("%s exited while starting:\n%s", m.name, m.p.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after %s: %v\n%s", m.name, d, body, m.p.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metaLeader returns the JetStream meta leader /readyz names.
func metaLeader(addr string) string {
	_, body := readyz(addr)
	if c, ok := body["cluster"].(map[string]any); ok {
		s, _ := c["meta_leader"].(string)
		return s
	}
	return ""
}

// publisher publishes to topics at a steady rate through base URLs (one is
// picked at random per request) and records every acknowledged seq.
type publisher struct {
	bases  []string // http://host:port
	topics []string
	rate   int // messages per second
	conc   int

	mu      sync.Mutex
	acked   map[string][]uint64
	failed  int
	errs    map[string]int
	samples map[string]string // a body per failure reason
	fails   []time.Time       // when each failed publish was sent
	sent    atomic.Int64
}

func newPublisher(bases, topics []string, rate int) *publisher {
	return &publisher{bases: bases, topics: topics, rate: rate, conc: max(64, rate/4),
		acked: map[string][]uint64{}, errs: map[string]int{}, samples: map[string]string{}}
}

// run publishes until ctx ends.
func (p *publisher) run(ctx context.Context) {
	tr := &http.Transport{MaxIdleConnsPerHost: p.conc, IdleConnTimeout: 5 * time.Second}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	jobs := make(chan int, p.conc*4)
	var wg sync.WaitGroup
	for range p.conc {
		wg.Go(func() {
			for n := range jobs {
				p.publish(ctx, hc, n)
			}
		})
	}
	const tick = 10 * time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	start, n := time.Now(), 0
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-t.C:
			due := int(time.Since(start).Seconds() * float64(p.rate))
			for ; n < due; n++ {
				select {
				case jobs <- n:
				case <-ctx.Done():
					break loop
				}
			}
		}
	}
	close(jobs)
	wg.Wait()
}

func (p *publisher) publish(ctx context.Context, hc *http.Client, n int) {
	topic := p.topics[n%len(p.topics)]
	body := fmt.Sprintf(`{"topic":%q,"event":"m","data":{"n":%d}}`, topic, n)
	base := p.bases[rand.IntN(len(p.bases))]
	p.sent.Add(1)
	sentAt := time.Now()
	req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, base+"/api/publish", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	var out struct{ Seq uint64 }
	reason, sample := "", ""
	switch {
	case err != nil:
		reason, sample = "transport", err.Error()
	default:
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &out) != nil || out.Seq == 0 {
			reason, sample = strconv.Itoa(resp.StatusCode), string(b)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if reason != "" {
		p.failed++
		p.errs[reason]++
		p.fails = append(p.fails, sentAt)
		if _, ok := p.samples[reason]; !ok {
			p.samples[reason] = sample
		}
		return
	}
	p.acked[topic] = append(p.acked[topic], out.Seq)
}

// summary is what the publisher did.
func (p *publisher) summary() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, s := range p.acked {
		n += len(s)
	}
	return fmt.Sprintf("%d sent, %d acknowledged, %d failed %v %v", p.sent.Load(), n, p.failed, p.errs, p.samples)
}

// publishOne publishes one message to topic at base, retrying for a while,
// and returns its seq.
func publishOne(t *testing.T, base, topic string) uint64 {
	t.Helper()
	var seq uint64
	fabrictest.WaitFor(t, 30*time.Second, "a publish to "+topic, func() bool {
		pub := newPublisher([]string{base}, []string{topic}, 1)
		pub.publish(context.Background(), http.DefaultClient, 0)
		if s := pub.acked[topic]; len(s) == 1 {
			seq = s[0]
			return true
		}
		t.Logf("publish to %s at %s failed: %v (retrying)", topic, base, pub.errs)
		return false
	})
	return seq
}

// historyOf reads every retained seq of topic from the instance at base,
// retrying for a while (a stream may be electing a leader).
func historyOf(t *testing.T, base, topic string) []uint64 {
	t.Helper()
	var seqs []uint64
	var err error
	fabrictest.WaitFor(t, 60*time.Second, "the history of "+topic+" at "+base, func() bool {
		seqs, err = history(base, topic)
		return err == nil
	})
	return seqs
}

// failuresBetween counts the failed publishes sent in [from, to).
func (p *publisher) failuresBetween(from, to time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, at := range p.fails {
		if !at.Before(from) && at.Before(to) {
			n++
		}
	}
	return n
}

// history reads every retained seq of topic from the instance at base.
func history(base, topic string) ([]uint64, error) {
	var out []uint64
	since := uint64(0)
	for {
		body := fmt.Sprintf(`{"topic":%q,"since":%d,"limit":1000}`, topic, since)
		resp, err := http.Post(base+"/api/history", "application/json", bytes.NewBufferString(body))
		if err != nil {
			return nil, err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var r struct {
			Messages []struct{ Seq uint64 }
			More     bool
		}
		if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &r) != nil {
			return nil, fmt.Errorf("history %s: %d %s", topic, resp.StatusCode, b)
		}
		for _, m := range r.Messages {
			out = append(out, m.Seq)
		}
		if !r.More || len(r.Messages) == 0 {
			return out, nil
		}
		since = r.Messages[len(r.Messages)-1].Seq
	}
}

// receiver is a reconnecting client subscribed to one topic that records
// the seq of every message it gets.
type receiver struct {
	c     *wsclient.Client
	topic string

	mu    sync.Mutex
	seqs  []uint64
	conns []int       // the client's connection count when each seq came
	at    []time.Time // when each seq came
	done  chan struct{}
}

// around describes what the receiver got near seq: each seq with the
// connection it came on, to tell a gap at a reconnection from one within a
// connection.
func (r *receiver) around(seq uint64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for i, s := range r.seqs {
		if s+5 >= seq && s <= seq+5 {
			fmt.Fprintf(&b, "%d(conn %d, %s) ", s, r.conns[i], r.at[i].Format("15:04:05.000"))
		}
	}
	return b.String()
}

func newReceiver(t *testing.T, ctx context.Context, url, topic string) *receiver {
	t.Helper()
	c, err := wsclient.Dial(ctx, url, wsclient.Options{Reconnect: true, MinBackoff: 50 * time.Millisecond,
		MaxBackoff: time.Second, Buffer: 4096})
	if err != nil {
		t.Fatal(err)
	}
	r := &receiver{c: c, topic: topic, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for e := range c.Events() {
			if e.Topic == topic && e.Seq > 0 {
				r.mu.Lock()
				r.seqs = append(r.seqs, e.Seq)
				r.conns = append(r.conns, c.Connections())
				r.at = append(r.at, time.Now())
				r.mu.Unlock()
			}
		}
	}()
	if err := c.Subscribe(ctx, topic); err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(r.close)
	return r
}

func (r *receiver) close() {
	r.c.Close()
	<-r.done
}

func (r *receiver) got() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.seqs...)
}

func (r *receiver) last() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.seqs) == 0 {
		return 0
	}
	return r.seqs[len(r.seqs)-1]
}

// checkSequence compares what a receiver got with the topic's stored seqs:
// the same, in order, no gap, no duplicate.
func checkSequence(got, want []uint64) string {
	if len(got) == len(want) {
		same := true
		for i := range got {
			if got[i] != want[i] {
				same = false
				break
			}
		}
		if same {
			return ""
		}
	}
	seen := map[uint64]int{}
	var dups []uint64
	for _, s := range got {
		if seen[s]++; seen[s] == 2 {
			dups = append(dups, s)
		}
	}
	var missing []uint64
	for _, s := range want {
		if seen[s] == 0 {
			missing = append(missing, s)
		}
	}
	disorder := !sort.SliceIsSorted(got, func(i, j int) bool { return got[i] < got[j] })
	return fmt.Sprintf("got %d messages, %d stored: %d missing %v, duplicates %v, out of order %v",
		len(got), len(want), len(missing), clipSeqs(missing), clipSeqs(dups), disorder)
}

// firstMissing returns the first seq of want that got lacks (0: none).
func firstMissing(got, want []uint64) uint64 {
	in := map[uint64]bool{}
	for _, s := range got {
		in[s] = true
	}
	for _, s := range want {
		if !in[s] {
			return s
		}
	}
	return 0
}

func clipSeqs(s []uint64) []uint64 {
	if len(s) > 10 {
		return s[:10]
	}
	return s
}

// children returns the pids of pid's child processes.
func children(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		cpid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after
		// the last ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 {
			if ppid, _ := strconv.Atoi(f[1]); ppid == pid {
				out = append(out, cpid)
			}
		}
	}
	sort.Ints(out)
	return out
}
