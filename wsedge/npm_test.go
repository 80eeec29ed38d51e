package wsedge_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
)

// The harness in testdata/npm (see its README.md).
const npmHarnessDir = "testdata/npm"

// npmNeed is what the npm client test needs from the machine.
const npmNeed = "the npm client test needs Node.js >= 20.10 and npm on PATH " +
	"(Debian: apt-get install nodejs npm) and the npm registry for its first install"

var (
	npmInstallTimeout = 5 * time.Minute
	npmHarnessTimeout = 60 * time.Second
)

// TestNpmClients runs the unmodified svelte-adapter-uws and svelte-realtime
// browser clients in Node against a running Fabric instance: a subscription
// receives a message published over POST /api/publish, svelte-realtime RPCs
// reach Go handlers (results, NOT_FOUND, LiveError, internal errors,
// batches), and the replay and presence plugin clients work against it.
func TestNpmClients(t *testing.T) {
	node, nodeArgs := findNode(t)
	modules := npmModules(t)
	runDir := stageHarness(t, modules)

	var counter atomic.Int64
	var seen sync.Map // every topic any client subscribed to
	var historyMu sync.Mutex
	var historySeqs []uint64
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: fabric.Config{Persistent: fabric.MatchTopics([]string{"log"})}, History: func(i *fabrictest.Instance) (fabric.History, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return jetstream.NewHistory(ctx, i.JS, jetstream.HistoryOptions{Prefix: i.Broker.Prefix(), Eager: true})
	}, Setup: func(i *fabrictest.Instance) {
		i.Node.Observe(subscribeRecorder{&seen})
		// What a page's load() would do: publish, and hand the seq over.
		i.Mux.HandleFunc("/test/history", func(w http.ResponseWriter, r *http.Request) {
			var seqs []uint64
			for n := 1; n <= 3; n++ {
				seq, err := i.Node.Publish(r.Context(), "log", "n", n)
				if err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
				seqs = append(seqs, seq)
			}
			historyMu.Lock()
			historySeqs = seqs
			historyMu.Unlock()
			_ = json.NewEncoder(w).Encode(map[string]any{"seqs": seqs})
		})
		i.Node.HandleRPC("chat/echo", func(_ context.Context, call *fabric.Call) (any, error) {
			var in struct {
				Text string `json:"text"`
			}
			var n int
			if err := call.Arg(0, &in); err != nil {
				return nil, err
			}
			if err := call.Arg(1, &n); err != nil {
				return nil, err
			}
			return map[string]any{"echo": in.Text, "twice": 2 * n, "args": len(call.Args)}, nil
		})
		i.Node.HandleRPC("chat/add", func(_ context.Context, call *fabric.Call) (any, error) {
			var a, b int
			if err := call.Arg(0, &a); err != nil {
				return nil, err
			}
			if err := call.Arg(1, &b); err != nil {
				return nil, err
			}
			return a + b, nil
		})
		i.Node.HandleRPC("chat/next", func(context.Context, *fabric.Call) (any, error) {
			return counter.Add(1), nil
		})
		i.Node.HandleRPC("chat/validate", func(context.Context, *fabric.Call) (any, error) {
			return nil, &fabric.LiveError{
				Code:    fabric.CodeValidation,
				Message: "text is required",
				Issues:  []map[string]any{{"path": []string{"text"}, "message": "Required"}},
			}
		})
		i.Node.HandleRPC("chat/boom", func(context.Context, *fabric.Call) (any, error) {
			return nil, errors.New("db password=hunter2 rejected")
		})
	}})

	ctx, cancel := context.WithTimeout(context.Background(), npmHarnessTimeout)
	defer cancel()
	args := append(nodeArgs, "--import", "./register-shim.mjs", "harness.mjs", inst.HTTP.URL)
	cmd := exec.CommandContext(ctx, node, args...)
	cmd.Dir = runDir
	cmd.Env = append(os.Environ(), "NODE_ENV=development")
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}

	published := map[string]string{
		"chat": `{"id":1,"text":"héllo \"npm\" ✓","tags":["a",null,true,2.5]}`,
		"feed": `{"n":7}`,
		"log":  `4`,
	}
	steps := map[string]json.RawMessage{}
	var order []string
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var s struct {
			Step  string `json:"step"`
			Topic string `json:"topic"`
		}
		if err := json.Unmarshal(line, &s); err != nil || s.Step == "" {
			t.Errorf("harness printed a non-step line: %s", line)
			continue
		}
		t.Logf("harness: %s", line)
		order = append(order, s.Step)
		switch s.Step {
		case "error":
			t.Errorf("harness failed: %s", line)
		case "subscribed":
			// The client sent its subscribe; publish once the server
			// has processed it (Subscribed is set after the broker
			// subscription exists), so the message cannot be missed.
			waitSubscribed(t, inst.Node, s.Topic)
			inst.Publish(s.Topic, "created", published[s.Topic])
		case "presence":
			// The harness unsubscribes right after this line: ask whether
			// the subscribe happened, not whether it still holds.
			fabrictest.WaitFor(t, 10*time.Second, "a subscribe to __presence:room", func() bool {
				_, ok := seen.Load("__presence:room")
				return ok
			})
		}
		steps[s.Step] = append(json.RawMessage(nil), line...)
	}
	waitErr := cmd.Wait()
	if ctx.Err() != nil {
		t.Fatalf("harness timed out after %s; steps %v; stderr:\n%s", npmHarnessTimeout, order, stderr.String())
	}
	if waitErr != nil || sc.Err() != nil {
		t.Fatalf("harness: %v (scan: %v); steps %v; stderr:\n%s", waitErr, sc.Err(), order, stderr.String())
	}
	if stderr.Len() > 0 {
		t.Logf("harness stderr:\n%s", stderr.String())
	}

	// The adapter client the harness loaded is 0.3.4's (plus the shim's
	// additions, which only svelte-realtime sees).
	expectStep(t, steps, "loaded", `{"step":"loaded",
		"versions":{"svelte":"5.57.3","svelte-adapter-uws":"0.3.4","svelte-realtime":"0.5.12"},
		"adapterExports":["connect","count","crud","latest","lookup","on","once","ready","status"],
		"realtimeShimmed":["onDerived","failure"]}`)

	// The envelope published over POST /api/publish, exactly.
	expectStep(t, steps, "message", `{"step":"message","envelope":{"topic":"chat","event":"created","data":`+published["chat"]+`}}`)

	// An RPC answered by the Go handler.
	expectStep(t, steps, "rpc", `{"step":"rpc","result":{"echo":"hi ✓","twice":42,"args":2}}`)

	// Unknown path: RpcError NOT_FOUND.
	expectStep(t, steps, "rpc-missing", `{"step":"rpc-missing","resolved":false,"isRpcError":true,
		"code":"NOT_FOUND","message":"Not found","issues":null}`)

	// A LiveError: its code, message and issues reach the client.
	expectStep(t, steps, "rpc-live-error", `{"step":"rpc-live-error","resolved":false,"isRpcError":true,
		"code":"VALIDATION","message":"text is required","issues":[{"path":["text"],"message":"Required"}]}`)

	// Any other error: INTERNAL_ERROR with a generic message, nothing leaked.
	expectStep(t, steps, "rpc-internal", `{"step":"rpc-internal","resolved":false,"isRpcError":true,
		"code":"INTERNAL_ERROR","message":"Internal server error","issues":null}`)

	// batch(): per-call results in call order, the failure isolated.
	expectStep(t, steps, "batch", `{"step":"batch","results":[
		{"ok":true,"value":3},{"ok":true,"value":42},
		{"ok":false,"isRpcError":true,"code":"NOT_FOUND","message":"Not found","issues":null}]}`)

	// batch(..., {sequential: true}) runs the calls one after another.
	expectStep(t, steps, "batch-sequential", `{"step":"batch-sequential","results":[1,2,3]}`)

	// The presence client subscribed to __presence:room and saw no one.
	expectStep(t, steps, "presence", `{"step":"presence","topic":"__presence:room","value":[]}`)

	// Replay without history: "end" at once, then live messages flow.
	var end struct {
		Envelope struct {
			Topic, Event string
			Data         map[string]any
		}
	}
	if err := json.Unmarshal(steps["replay-end"], &end); err != nil || end.Envelope.Topic != "__replay:feed" || end.Envelope.Event != "end" {
		t.Errorf("replay-end: got %s (%v), want an \"end\" event on __replay:feed", steps["replay-end"], err)
	}
	expectStep(t, steps, "replay-live", `{"step":"replay-live","envelope":{"topic":"feed","event":"created","data":`+published["feed"]+`}}`)

	// Replay against real history: the two messages after the first, their
	// end (recovered, at the third's seq), then the live one.
	historyMu.Lock()
	defer historyMu.Unlock()
	if len(historySeqs) == 3 {
		expectStep(t, steps, "replay-history", fmt.Sprintf(`{"step":"replay-history",
			"end":{"seq":%d,"epoch":%q,"recovered":true},
			"values":[{"topic":"log","event":"n","data":2},{"topic":"log","event":"n","data":3},
				{"topic":"log","event":"created","data":4}]}`, historySeqs[2], epochOf(t, inst)))
	} else {
		t.Errorf("the harness never fetched /test/history")
	}

	// One connection, opened once and never dropped.
	expectStep(t, steps, "done", `{"step":"done","statuses":["connecting","open"]}`)
}

// expectStep compares the harness's JSON for step with want, as JSON values.
func expectStep(t *testing.T, steps map[string]json.RawMessage, step, want string) {
	t.Helper()
	got, ok := steps[step]
	if !ok {
		t.Errorf("harness never reported step %q", step)
		return
	}
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Errorf("step %q: %v", step, err)
		return
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("step %q: bad expectation: %v", step, err)
	}
	if !reflect.DeepEqual(g, w) {
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		t.Errorf("step %q:\n got %s\nwant %s", step, gb, wb)
	}
}

// waitSubscribed waits until some client of node is subscribed to topic.
func waitSubscribed(t *testing.T, node *fabric.Node, topic string) {
	t.Helper()
	fabrictest.WaitFor(t, 10*time.Second, "a client subscribed to "+topic, func() bool {
		found := false
		node.Each(func(c *fabric.Client) bool {
			found = c.Subscribed(topic)
			return !found
		})
		return found
	})
}

// needTool fails the test under CI=true and skips it otherwise.
func needTool(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...) + "; " + npmNeed
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// findNode returns the node binary and the flags that give it a global
// WebSocket (none from Node 22 on; --experimental-websocket on 20.10+).
func findNode(t *testing.T) (string, []string) {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		needTool(t, "node not found on PATH")
	}
	if _, err := exec.LookPath("npm"); err != nil {
		needTool(t, "npm not found on PATH")
	}
	out, err := exec.Command(node, "--version").Output()
	if err != nil {
		needTool(t, "node --version: %v", err)
	}
	version := strings.TrimSpace(string(out))
	m := regexp.MustCompile(`^v(\d+)\.(\d+)\.`).FindStringSubmatch(version)
	if m == nil {
		needTool(t, "cannot read node version %q", version)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	if major < 20 || major == 20 && minor < 10 {
		needTool(t, "node %s is too old", version)
	}
	for _, flags := range [][]string{nil, {"--experimental-websocket"}} {
		probe := exec.Command(node, append(flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)")...)
		if probe.Run() == nil {
			return node, flags
		}
	}
	needTool(t, "node %s has no WebSocket, even with --experimental-websocket", version)
	return "", nil
}

// npmModules installs the harness's locked dependencies into a cache
// directory keyed by the hash of package.json, package-lock.json and .npmrc,
// once, and returns its node_modules. The cache is $FABRIC_NPM_CACHE, else
// the user cache dir's fabric/npm-harness.
//
// It runs `npm install --no-save --omit=optional`, not `npm ci`: the
// adapter declares an optional dependency on uWebSockets.js from GitHub,
// which the registry cannot serve, so the lockfile (made with npm install,
// where the optional dependency failed and was skipped) lacks it and npm ci
// refuses the lockfile as out of sync. npm install with that lockfile
// installs exactly the locked versions and checks their integrity hashes;
// --no-save leaves the lockfile as it is.
func npmModules(t *testing.T) string {
	t.Helper()
	files := []string{"package.json", "package-lock.json", ".npmrc"}
	h := sha256.New()
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(npmHarnessDir, f))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]

	cache := os.Getenv("FABRIC_NPM_CACHE")
	if cache == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		cache = filepath.Join(base, "fabric", "npm-harness")
	}
	dir := filepath.Join(cache, key)
	modules := filepath.Join(dir, "node_modules")
	if _, err := os.Stat(modules); err == nil {
		return modules
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(cache, key+".tmp-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp) // gone after a successful rename
	for _, f := range files {
		copyFile(t, filepath.Join(npmHarnessDir, f), filepath.Join(tmp, f))
	}

	ctx, cancel := context.WithTimeout(context.Background(), npmInstallTimeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "npm", "install", "--no-save", "--omit=optional", "--ignore-scripts",
		"--no-audit", "--no-fund", "--prefer-offline")
	cmd.Dir = tmp
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			needTool(t, "npm install did not finish within %s:\n%s", npmInstallTimeout, out)
		case networkFailure(out):
			needTool(t, "npm install could not reach the registry: %v\n%s", err, out)
		default:
			t.Fatalf("npm install in a copy of %s: %v\n%s", npmHarnessDir, err, out)
		}
	}
	t.Logf("npm install: %s", time.Since(start).Round(time.Millisecond))
	if err := os.Rename(tmp, dir); err != nil {
		if _, statErr := os.Stat(modules); statErr != nil { // not a concurrent install that won
			t.Fatalf("install npm harness cache: %v", err)
		}
	}
	return modules
}

var npmNetworkError = regexp.MustCompile(`\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|ENETDOWN)\b|network request to .* failed`)

func networkFailure(out []byte) bool { return npmNetworkError.Match(out) }

// stageHarness makes a run directory holding the harness's scripts and a
// node_modules link to the installed dependencies.
func stageHarness(t *testing.T, modules string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(npmHarnessDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), ".mjs") {
			copyFile(t, filepath.Join(npmHarnessDir, e.Name()), filepath.Join(dir, e.Name()))
		}
	}
	if err := os.Symlink(modules, filepath.Join(dir, "node_modules")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// subscribeRecorder is an Observer that remembers every topic subscribed to.
type subscribeRecorder struct{ seen *sync.Map }

func (r subscribeRecorder) Connected(*fabric.Client)                  {}
func (r subscribeRecorder) Subscribed(_ *fabric.Client, topic string) { r.seen.Store(topic, true) }
func (r subscribeRecorder) Unsubscribed(*fabric.Client, string)       {}
func (r subscribeRecorder) Disconnected(*fabric.Client)               {}

func epochOf(t *testing.T, inst *fabrictest.Instance) string {
	e, err := inst.Node.History().Epoch(context.Background(), "log")
	if err != nil {
		t.Fatal(err)
	}
	return e
}
