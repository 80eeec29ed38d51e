package redis_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/redis"
	"github.com/redis/rueidis"
)

// The Redis the tests use: FABRIC_TEST_REDIS_URL, else the machine's
// 127.0.0.1:6379 when it answers, else a throwaway redis-server on a free
// port for the whole test binary. Under CI=true a missing Redis fails the
// tests instead of skipping them.

var (
	sharedOnce sync.Once
	sharedURL  string
	sharedErr  error
	sharedProc *redisProc
)

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedProc != nil {
		sharedProc.kill()
	}
	os.Exit(code)
}

// needRedis returns the URL of the shared test Redis, or skips (fails
// under CI=true) when there is none.
func needRedis(t testing.TB) string {
	t.Helper()
	sharedOnce.Do(func() {
		if u := os.Getenv("FABRIC_TEST_REDIS_URL"); u != "" {
			sharedURL, sharedErr = u, ping(u)
			return
		}
		if ping("redis://127.0.0.1:6379") == nil {
			sharedURL = "redis://127.0.0.1:6379"
			return
		}
		if _, err := exec.LookPath("redis-server"); err != nil {
			sharedErr = fmt.Errorf("no Redis at 127.0.0.1:6379 and no redis-server to start: %w", err)
			return
		}
		dir, err := os.MkdirTemp("", "fabric-redis-*")
		if err != nil {
			sharedErr = err
			return
		}
		sharedProc, sharedErr = startRedisProc(dir, freePort(), nil)
		if sharedErr == nil {
			sharedURL = sharedProc.url()
		}
	})
	if sharedErr != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis: %v", sharedErr)
		}
		t.Skipf("redis: %v", sharedErr)
	}
	return sharedURL
}

func ping(u string) error {
	opt, err := rueidis.ParseURL(u)
	if err != nil {
		return err
	}
	opt.DisableCache = true
	opt.Dialer.Timeout = time.Second
	c, err := rueidis.NewClient(opt)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return c.Do(ctx, c.B().Ping().Build()).Error()
}

// redisProc is a redis-server this test binary started.
type redisProc struct {
	dir  string
	port int
	args []string
	mu   sync.Mutex
	cmd  *exec.Cmd
}

func (p *redisProc) url() string { return "redis://127.0.0.1:" + strconv.Itoa(p.port) }

func (p *redisProc) addr() string { return "127.0.0.1:" + strconv.Itoa(p.port) }

// startRedisProc starts redis-server on port with args (after the
// defaults: loopback, no persistence, dir) and waits until it answers.
func startRedisProc(dir string, port int, args []string) (*redisProc, error) {
	p := &redisProc{dir: dir, port: port, args: args}
	return p, p.start()
}

func (p *redisProc) start() error {
	argv := append([]string{"--port", strconv.Itoa(p.port), "--bind", "127.0.0.1", "--dir", p.dir,
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--logfile", filepath.Join(p.dir, "redis.log")}, p.args...)
	cmd := exec.Command("redis-server", argv...)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	go func() { _ = cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ping(p.url()) == nil {
			return nil
		}
		if time.Now().After(deadline) {
			p.kill()
			log, _ := os.ReadFile(filepath.Join(p.dir, "redis.log"))
			return fmt.Errorf("redis-server on %d did not answer: %s", p.port, tail(string(log)))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill stops the process at once (SIGKILL), as a crash would.
func (p *redisProc) kill() {
	p.mu.Lock()
	cmd := p.cmd
	p.cmd = nil
	p.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = cmd.Process.Kill()
		// The port is free once the process is gone.
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if c, err := net.DialTimeout("tcp", p.addr(), 100*time.Millisecond); err != nil {
				return
			} else {
				c.Close()
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func tail(s string) string {
	if len(s) > 2000 {
		return s[len(s)-2000:]
	}
	return s
}

// startRedis starts a throwaway redis-server for one test (stopped at its
// cleanup), skipping when there is no redis-server.
func startRedis(t testing.TB, args ...string) *redisProc {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("no redis-server")
		}
		t.Skip("no redis-server")
	}
	p, err := startRedisProc(t.TempDir(), freePort(), args)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.kill)
	return p
}

// startCluster starts a Redis Cluster of three masters (no replicas) on
// loopback ports for one test and returns its URL (every node in addr).
func startCluster(t testing.TB, server string) string {
	t.Helper()
	bin := server + "-server"
	cli := server + "-cli"
	for _, b := range []string{bin, cli} {
		if _, err := exec.LookPath(b); err != nil {
			if os.Getenv("CI") == "true" && server == "redis" {
				t.Fatalf("no %s", b)
			}
			t.Skipf("no %s", b)
		}
	}
	var procs []*redisProc
	var addrs []string
	for range 3 {
		dir := t.TempDir()
		port := freeClusterPort()
		p := &redisProc{dir: dir, port: port, args: []string{"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(dir, "nodes.conf"), "--cluster-node-timeout", "2000"}}
		if err := p.startWith(bin); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.kill)
		procs = append(procs, p)
		addrs = append(addrs, p.addr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, cli, append(append([]string{"--cluster", "create"}, addrs...),
		"--cluster-replicas", "0", "--cluster-yes")...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s --cluster create: %v\n%s", cli, err, out)
	}
	// Every node must agree the cluster is up before clients route.
	fabrictest.WaitFor(t, 30*time.Second, "cluster_state:ok on every node", func() bool {
		for _, a := range addrs {
			o, err := exec.CommandContext(ctx, cli, "-h", "127.0.0.1", "-p", a[strings.LastIndexByte(a, ':')+1:], "cluster", "info").Output()
			if err != nil || !strings.Contains(string(o), "cluster_state:ok") {
				return false
			}
		}
		return true
	})
	u := "redis://" + addrs[0] + "?addr=" + addrs[1] + "&addr=" + addrs[2]
	return u
}

// startSentinel starts a master and one Sentinel monitoring it (quorum 1)
// for one test and returns the URL that reaches the master through the
// Sentinel.
func startSentinel(t testing.TB) string {
	t.Helper()
	master := startRedis(t)
	dir := t.TempDir()
	port := freePort()
	conf := filepath.Join(dir, "sentinel.conf")
	cfg := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor fabric 127.0.0.1 %d 1\nsentinel down-after-milliseconds fabric 5000\n", port, dir, master.port)
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("redis-server", conf, "--sentinel", "--logfile", filepath.Join(dir, "sentinel.log"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	addr := "127.0.0.1:" + strconv.Itoa(port)
	fabrictest.WaitFor(t, 10*time.Second, "the Sentinel to know the master", func() bool {
		out, err := exec.Command("redis-cli", "-p", strconv.Itoa(port), "sentinel", "get-master-addr-by-name", "fabric").Output()
		return err == nil && strings.Contains(string(out), strconv.Itoa(master.port))
	})
	return "redis://" + addr + "?master_set=fabric"
}

// startWith starts the process with another binary (valkey-server).
func (p *redisProc) startWith(bin string) error {
	if bin == "redis-server" {
		return p.start()
	}
	argv := append([]string{"--port", strconv.Itoa(p.port), "--bind", "127.0.0.1", "--dir", p.dir,
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--logfile", filepath.Join(p.dir, "server.log")}, p.args...)
	cmd := exec.Command(bin, argv...)
	if err := cmd.Start(); err != nil {
		return err
	}
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	go func() { _ = cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for ping(p.url()) != nil {
		if time.Now().After(deadline) {
			p.kill()
			return fmt.Errorf("%s on %d did not answer", bin, p.port)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

var portMu sync.Mutex

// freePort returns a free loopback TCP port.
func freePort() int {
	portMu.Lock()
	defer portMu.Unlock()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// freeClusterPort returns a free port whose cluster bus port (+10000) is
// free too.
func freeClusterPort() int {
	for {
		p := freePort()
		if p+10000 > 65535 {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+10000))
		if err != nil {
			continue
		}
		l.Close()
		return p
	}
}

// newBackend connects a Backend for a test (closed at its cleanup).
func newBackend(t testing.TB, o redis.Options) *redis.Backend {
	t.Helper()
	if o.Logger == nil {
		o.Logger = fabrictest.Logger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := redis.New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// dropPrefix deletes every key of prefix on every node of the Redis at
// url (the shared Redis outlives the tests).
func dropPrefix(t testing.TB, url, prefix, pattern string) int {
	t.Helper()
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	opt.DisableCache = true
	c, err := rueidis.NewClient(opt)
	if err != nil {
		t.Logf("cleanup of %s: %v", prefix, err)
		return 0
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := 0
	for _, node := range c.Nodes() {
		cursor := uint64(0)
		for {
			e, err := node.Do(ctx, node.B().Scan().Cursor(cursor).Match(prefix+pattern).Count(1000).Build()).AsScanEntry()
			if err != nil {
				t.Logf("cleanup of %s: %v", prefix, err)
				break
			}
			for _, k := range e.Elements {
				if err := node.Do(ctx, node.B().Unlink().Key(k).Build()).Error(); err == nil {
					n++
				}
			}
			if cursor = e.Cursor; cursor == 0 {
				break
			}
		}
	}
	return n
}

// readLines reads a file's lines (a server's log, for failures).
func readLines(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}
