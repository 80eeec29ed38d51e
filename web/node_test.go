package web_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// What the JavaScript tests need from the machine, and where to get it.
const nodeNeed = "the fabric.js tests need Node.js >= 20.10 and npm on PATH (Debian: apt-get install nodejs npm)"

// needTool fails the test under CI=true and skips it otherwise.
func needTool(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// findNode returns the node binary, checking its version.
func findNode(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		needTool(t, "node not found on PATH; %s", nodeNeed)
	}
	out, err := exec.Command(node, "--version").Output()
	if err != nil {
		needTool(t, "node --version: %v; %s", err, nodeNeed)
	}
	version := strings.TrimSpace(string(out))
	m := regexp.MustCompile(`^v(\d+)\.(\d+)\.`).FindStringSubmatch(version)
	if m == nil {
		needTool(t, "cannot read node version %q; %s", version, nodeNeed)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	if major < 20 || major == 20 && minor < 10 {
		needTool(t, "node %s is too old; %s", version, nodeNeed)
	}
	return node
}

// npmModules installs the locked dependencies of dir (package.json,
// package-lock.json, .npmrc) once into a cache directory keyed by their
// hash ($FABRIC_NPM_CACHE, else the user cache dir's fabric/npm-<name>)
// and returns its node_modules. Nothing is written into the source tree.
func npmModules(t *testing.T, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("npm"); err != nil {
		needTool(t, "npm not found on PATH; %s", nodeNeed)
	}
	files := []string{"package.json", "package-lock.json", ".npmrc"}
	h := sha256.New()
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
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
		cache = filepath.Join(base, "fabric", "npm-"+filepath.Base(dir))
	}
	target := filepath.Join(cache, key)
	modules := filepath.Join(target, "node_modules")
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
		copyFile(t, filepath.Join(dir, f), filepath.Join(tmp, f))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline")
	cmd.Dir = tmp
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			needTool(t, "npm ci did not finish within 5m:\n%s", out)
		case npmNetworkError.Match(out):
			needTool(t, "npm ci could not reach the npm registry (needed once, for the first run): %v\n%s", err, out)
		default:
			t.Fatalf("npm ci in a copy of %s: %v\n%s", dir, err, out)
		}
	}
	t.Logf("npm ci %s: %s", dir, time.Since(start).Round(time.Millisecond))
	if err := os.Rename(tmp, target); err != nil {
		if _, statErr := os.Stat(modules); statErr != nil { // not a concurrent install that won
			t.Fatalf("install %s's modules into the cache: %v", dir, err)
		}
	}
	return modules
}

var npmNetworkError = regexp.MustCompile(`\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|ENETDOWN)\b|network request to .* failed`)

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

// TestClientUnit runs fabric.js's unit tests (test/*.test.mjs) with node's
// test runner: reconnect delays and the 10,000-client storm histogram,
// resume, close codes, RPC, presence, tokens, the SSE fallback, against
// scripted transports.
func TestClientUnit(t *testing.T) {
	t.Parallel()
	node := findNode(t)
	files, err := filepath.Glob("test/*.test.mjs")
	if err != nil || len(files) == 0 {
		t.Fatalf("no test files in web/test (%v)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, append([]string{"--test", "--test-reporter=spec"}, files...)...)
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = append(os.Environ(), "NO_COLOR=1", "FORCE_COLOR=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node --test: %v\n%s", err, out)
	}
	summary := regexp.MustCompile(`(?m)^ℹ (tests|pass|fail) \d+$`).FindAllString(string(out), -1)
	t.Logf("node --test %s: %s", strings.Join(files, " "), strings.Join(summary, ", "))
	if testing.Verbose() {
		t.Logf("%s", out)
	}
}
