package main

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/admission"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/server"
)

// TestHelp: every command prints its full usage on --help and -h and
// exits 0; unknown flags exit 2 with the usage on stderr.
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		has  []string
	}{
		{[]string{"--help"}, []string{"fabric serve", "fabric sub", "fabric version", "fabric help"}},
		{[]string{"-h"}, []string{"fabric serve", "fabric sub"}},
		{[]string{"help"}, []string{"fabric serve", "fabric sub"}},
		{[]string{"help", "serve"}, []string{"Usage: fabric serve", "--listen", "FABRIC_LISTEN", "http.listen"}},
		{[]string{"help", "sub"}, []string{"Usage: fabric sub", "--since", "--count"}},
		{[]string{"help", "version"}, []string{"Usage: fabric version"}},
		{[]string{"help", "help"}, []string{"Usage: fabric help"}},
		{[]string{"help", "--help"}, []string{"fabric serve"}},
		{[]string{"serve", "--help"}, []string{"Usage: fabric serve", "--listen"}},
		{[]string{"serve", "-h"}, []string{"Usage: fabric serve", "--listen"}},
		{[]string{"serve", "--listen", ":1", "-help"}, []string{"Usage: fabric serve"}},
		{[]string{"sub", "--help"}, []string{"Usage: fabric sub", "--url"}},
		{[]string{"sub", "-h"}, []string{"Usage: fabric sub", "--url"}},
		{[]string{"version", "--help"}, []string{"Usage: fabric version"}},
		{[]string{"version", "-h"}, []string{"Usage: fabric version"}},
	} {
		var out, errb bytes.Buffer
		if code := run(tc.args, &out, &errb); code != 0 || errb.Len() > 0 {
			t.Errorf("fabric %v: exit %d, stderr %q", tc.args, code, errb.String())
		}
		for _, h := range tc.has {
			if !strings.Contains(out.String(), h) {
				t.Errorf("fabric %v: usage lacks %q:\n%s", tc.args, h, out.String())
			}
		}
	}
	for _, args := range [][]string{
		{"serve", "--no-such-flag"}, {"serve", "stray"}, {"sub", "--nope", "t"}, {"sub"},
		{"version", "--nope"}, {"help", "nope"}, {"nope"}, {},
	} {
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code != 2 || !strings.Contains(errb.String(), "Usage") {
			t.Errorf("fabric %v: exit %d, stderr %q; want 2 and the usage", args, code, errb.String())
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "fabric ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
}

// TestServeUsageDocumentsEverySetting: --help lists every flag with its
// env twin and config key.
func TestServeUsageDocumentsEverySetting(t *testing.T) {
	var out bytes.Buffer
	serveUsage(&out)
	flags, keys := map[string]bool{}, map[string]bool{}
	for _, s := range settings {
		if flags[s.flag] || (s.key != "" && keys[s.key]) {
			t.Errorf("setting %s/%s listed twice", s.flag, s.key)
		}
		flags[s.flag], keys[s.key] = true, true
		if !strings.Contains(out.String(), "--"+s.flag+" ") && !strings.Contains(out.String(), "--"+s.flag+"\n") {
			t.Errorf("--help lacks --%s", s.flag)
		}
		if !strings.Contains(out.String(), s.env()) {
			t.Errorf("--help lacks %s", s.env())
		}
		if s.key != "" && !strings.Contains(out.String(), "key "+s.key) {
			t.Errorf("--help lacks key %s", s.key)
		}
	}
}

// TestDefaultsAreTheLibrarys: the command's defaults are server.Defaults,
// and every setting is bound to a distinct field.
func TestDefaultsAreTheLibrarys(t *testing.T) {
	c, _, err := parseServe(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c.Options, server.Defaults()) {
		t.Fatalf("command defaults %+v\nlibrary defaults %+v", c.Options, server.Defaults())
	}
	// Setting each one changes the options: no setting is bound to nothing.
	seen := map[string]string{}
	for _, s := range settings {
		c := newServeConfig()
		before := *c
		v := s.bind(c)
		sample := map[string]string{"string": "x", "int": "7", "bool": "true", "duration": "7s", "list": "a,b", "rate": "7/7s", "float": "0.7"}[v.Type()]
		if err := v.Set(sample); err != nil {
			t.Fatalf("--%s %s: %v", s.flag, sample, err)
		}
		if reflect.DeepEqual(before, *c) {
			t.Errorf("--%s changes nothing", s.flag)
		}
		key := v.Type() + ":" + strings.Join(diff(before, *c), ",")
		if other, dup := seen[key]; dup {
			t.Errorf("--%s and --%s set the same field", s.flag, other)
		}
		seen[key] = s.flag
	}
}

// diff names the fields where a and b differ.
func diff(a, b serveConfig) []string {
	var out []string
	var walk func(p string, x, y reflect.Value)
	walk = func(p string, x, y reflect.Value) {
		if x.Kind() == reflect.Struct {
			for i := range x.NumField() {
				walk(p+"."+x.Type().Field(i).Name, x.Field(i), y.Field(i))
			}
			return
		}
		if x.CanInterface() && !reflect.DeepEqual(x.Interface(), y.Interface()) {
			out = append(out, p)
		}
	}
	walk("", reflect.ValueOf(a), reflect.ValueOf(b))
	return out
}

func TestEnvTwins(t *testing.T) {
	t.Setenv("FABRIC_LISTEN", "127.0.0.1:1234")
	t.Setenv("FABRIC_IDLE_TIMEOUT", "7s")
	t.Setenv("FABRIC_ROUTES", "nats://a:1, nats://b:2")
	c, _, err := parseServe([]string{"--idle-timeout", "9s"})
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTP.Listen != "127.0.0.1:1234" {
		t.Errorf("FABRIC_LISTEN ignored: %q", c.HTTP.Listen)
	}
	if c.WebSocket.IdleTimeout != 9*time.Second {
		t.Errorf("command line should win over the environment: %s", c.WebSocket.IdleTimeout)
	}
	if !reflect.DeepEqual(c.Embed.Routes, []string{"nats://a:1", "nats://b:2"}) {
		t.Errorf("FABRIC_ROUTES: %q", c.Embed.Routes)
	}
	t.Setenv("FABRIC_MAX_PAYLOAD", "lots")
	if _, _, err := parseServe(nil); err == nil || !strings.Contains(err.Error(), "FABRIC_MAX_PAYLOAD") {
		t.Errorf("bad env value: %v", err)
	}
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fabric.yaml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConfigFile: keys, lists, topic policies, and the precedence flag >
// env > file > default.
func TestConfigFile(t *testing.T) {
	p := writeConfig(t, `
backend: nats
shutdown_timeout: 5s
log: {level: debug}
http:
  listen: 127.0.0.1:9000
  admin_listen: 127.0.0.1:9001
  max_requests: 50
  allowed_origins: [https://a.example, https://b.example]
websocket:
  idle_timeout: 1m
embed:
  routes: nats://x:6222, nats://y:6222
rate_limit:
  rpc: 30/10s
replay:
  max_age: 24h
topics:
  - pattern: "chat:*"
    persistent: true
    replay_max_per_topic: 500
    presence: true
    client_publish: true
  - pattern: "feed:*"
    persistent: true
    replay_max_per_topic: 500
admission:
  max_concurrent: 5000
  classes:
    - name: heavy
      reject_on: [MEMORY, PUBLISH_RATE]
      rpc: ["reports/*"]
    - name: hot
      cluster_top_publisher: 1000
      topics: ["cursor:*"]
pressure:
  memory_ratio: 0.9
`)
	t.Setenv("FABRIC_MAX_REQUESTS", "60")     // env over file
	t.Setenv("FABRIC_SHUTDOWN_TIMEOUT", "6s") // env over file, and the flag over env:
	c, _, err := parseServe([]string{"--config", p, "--shutdown-timeout", "7s", "--presence", "chat:*,room:*"})
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTP.Listen != "127.0.0.1:9000" || c.HTTP.AdminListen != "127.0.0.1:9001" || c.LogLevel != "debug" || c.LogFormat != "text" {
		t.Errorf("file keys: %+v %q %q", c.HTTP, c.LogLevel, c.LogFormat)
	}
	if c.HTTP.MaxRequests != 60 || c.ShutdownTimeout != 7*time.Second {
		t.Errorf("precedence: max_requests %d (want env's 60), shutdown_timeout %s (want the flag's 7s)", c.HTTP.MaxRequests, c.ShutdownTimeout)
	}
	if c.WebSocket.IdleTimeout != time.Minute || c.Replay.MaxAge != 24*time.Hour || c.Replay.MaxPerTopic != 200 {
		t.Errorf("durations: %+v %+v", c.WebSocket, c.Replay)
	}
	if !reflect.DeepEqual(c.HTTP.AllowedOrigins, []string{"https://a.example", "https://b.example"}) ||
		!reflect.DeepEqual(c.Embed.Routes, []string{"nats://x:6222", "nats://y:6222"}) {
		t.Errorf("lists: %q %q", c.HTTP.AllowedOrigins, c.Embed.Routes)
	}
	if c.RateLimit.Points != 30 || c.RateLimit.Interval != 10*time.Second {
		t.Errorf("rate: %+v", c.RateLimit)
	}
	wantClasses := []admission.ClassConfig{
		{Name: "heavy", RejectOn: []string{"MEMORY", "PUBLISH_RATE"}, RPC: []string{"reports/*"}},
		{Name: "hot", ClusterTopPublisher: 1000, Topics: []string{"cursor:*"}},
	}
	if c.Admission.MaxConcurrent != 5000 || !reflect.DeepEqual(c.Admission.Classes, wantClasses) || c.Pressure.MemoryRatio != 0.9 {
		t.Errorf("admission %+v, pressure %+v", c.Admission, c.Pressure)
	}
	ps, err := c.Policies()
	if err != nil {
		t.Fatal(err)
	}
	want := []server.TopicPolicy{
		{Pattern: "chat:*", Persistent: true, ReplayMaxPerTopic: 500, Presence: true, ClientPublish: true},
		{Pattern: "feed:*", Persistent: true, ReplayMaxPerTopic: 500},
		{Pattern: "room:*", Presence: true},
	}
	if !reflect.DeepEqual(ps, want) {
		t.Errorf("policies %+v\nwant %+v", ps, want)
	}
	// A shorthand policy keeps replay.max_per_topic (200), the file's keep
	// 500: one history cannot do both.
	c, _, err = parseServe([]string{"--config", p, "--replay", "news:*"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Policies(); err == nil || !strings.Contains(err.Error(), `"news:*"`) {
		t.Errorf("differing replay sizes: %v", err)
	}

	// FABRIC_CONFIG names the file when --config does not.
	t.Setenv("FABRIC_CONFIG", p)
	c, _, err = parseServe(nil)
	if err != nil || c.HTTP.Listen != "127.0.0.1:9000" {
		t.Fatalf("FABRIC_CONFIG: %v %q", err, c.HTTP.Listen)
	}
}

// TestConfigErrors: mistakes in the file name the file, the line and the key.
func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, text, want string
	}{
		{"unknown key", "http:\n  listen: :1\n  listn: :2\n", `fabric.yaml:3: unknown key "http.listn" (did you mean "http.listen"?)`},
		{"unknown top key", "backend: memory\n\nfoo: 1\n", `fabric.yaml:3: unknown key "foo"`},
		{"unknown group", "htp:\n  listen: :1\n", `fabric.yaml:1: unknown key "htp" (did you mean "http"?)`},
		{"bad value", "http:\n  max_requests: many\n", `fabric.yaml:2: http.max_requests: "many" is not an integer`},
		{"bad duration", "replay:\n  max_age: forever\n", `fabric.yaml:2: replay.max_age: "forever" is not a duration`},
		{"bad rate", "rate_limit:\n  rpc: fast\n", `fabric.yaml:2: rate_limit.rpc: rate "fast"`},
		{"list for scalar", "http:\n  listen: [a, b]\n", `fabric.yaml:2: http.listen: want a single value, not a list`},
		{"mapping for value", "backend:\n  kind: nats\n", `fabric.yaml:2: backend: want a value, not a mapping`},
		{"value for group", "http: 8080\n", `fabric.yaml:1: http must be a mapping of keys`},
		{"repeated key", "backend: nats\nbackend: memory\n", `fabric.yaml:2: key "backend" repeats (first at line 1)`},
		{"topics not a list", "topics:\n  pattern: x\n", `fabric.yaml:2: topics must be a list of policies`},
		{"unknown topic key", "topics:\n  - pattern: x\n    persist: true\n", `fabric.yaml:3: unknown key "topics[0].persist"`},
		{"topic without pattern", "topics:\n  - presence: true\n", `fabric.yaml:2: topics[0]: pattern is required`},
		{"bad topic value", "topics:\n  - pattern: x\n    presence: sometimes\n", `fabric.yaml:3: topics[0].presence: "sometimes" is not true or false`},
		{"syntax", "http:\n  listen: [\n", `fabric.yaml: yaml: line`},
		{"not a mapping", "- a\n- b\n", `fabric.yaml:1: the top level must be a mapping of keys`},
	} {
		p := writeConfig(t, tc.text)
		_, _, err := parseServe([]string{"--config", p})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v\nwant an error with %q", tc.name, err, tc.want)
		}
	}
	// An empty file, or null values, change nothing.
	for _, text := range []string{"", "# nothing\n", "http:\n  listen:\n"} {
		c, _, err := parseServe([]string{"--config", writeConfig(t, text)})
		if err != nil || c.HTTP.Listen != server.DefaultListen {
			t.Errorf("config %q: %v %q", text, err, c.HTTP.Listen)
		}
	}
	if _, _, err := parseServe([]string{"--config", "/no/such/fabric.yaml"}); err == nil {
		t.Error("a missing config file is not an error")
	}
}

// TestServeWithConfigFile runs the binary with a config file: the topic
// policies and the admin listener take effect, and a policy mistake stops
// it with a clear message.
func TestServeWithConfigFile(t *testing.T) {
	addrs := fabrictest.FreeAddrs(t, 2)
	p := writeConfig(t, "http:\n  admin_listen: "+addrs[1]+"\ntopics:\n  - pattern: \"chat:*\"\n    persistent: true\n")
	proc := startProc(t, addrs[0], "--config", p)
	resp, err := http.Post("http://"+addrs[1]+"/api/publish", "application/json", strings.NewReader(`{"topic":"chat:1","event":"m"}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"seq":1`) {
		t.Fatalf("publish on the admin listener: %d %s\n%s", resp.StatusCode, b, proc.out)
	}

	bad := writeConfig(t, "topics:\n  - pattern: a\n    persistent: true\n    replay_max_per_topic: 5\n  - pattern: b\n    persistent: true\n")
	cmd := launchProc(t, fabrictest.FreeAddr(t), "--config", bad)
	<-cmd.exited
	if cmd.cmd.ProcessState.ExitCode() != 1 || !strings.Contains(cmd.out.String(), "same replay_max_per_topic") {
		t.Fatalf("exit %d:\n%s", cmd.cmd.ProcessState.ExitCode(), cmd.out)
	}
}

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in     string
		points int
		iv     time.Duration
		ok     bool
	}{
		{"30/10s", 30, 10 * time.Second, true},
		{" 100 / 1m ", 100, time.Minute, true},
		{"30/10000", 30, 10 * time.Second, true},
		{"30", 0, 0, false}, {"0/1s", 0, 0, false}, {"x/1s", 0, 0, false}, {"5/soon", 0, 0, false}, {"5/-1s", 0, 0, false},
	} {
		p, iv, err := parseRate(tc.in)
		if (err == nil) != tc.ok || p != tc.points || iv != tc.iv {
			t.Errorf("parseRate(%q) = %d, %s, %v", tc.in, p, iv, err)
		}
	}
}
