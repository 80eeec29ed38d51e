package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
)

// tourMarker opens the README's tour: the ports and paths to replace.
var tourMarker = regexp.MustCompile(`<!-- tour-test ports=(\S+) paths=(\S+)`)

// TestReadmeTour runs the README's tour as written, as one bash script, with
// its ports and paths replaced by free ones: every command must succeed and
// every "# → " line must appear in what the script prints.
func TestReadmeTour(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and starts three servers")
	}
	for _, tool := range []string{"bash", "curl", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the tour needs %s: %v", tool, err)
		}
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	script, want := tourScript(t, string(readme))
	tmp := t.TempDir()
	ports := tourMarker.FindStringSubmatch(string(readme))
	var pairs []string
	free := fabrictest.FreeAddrs(t, len(strings.Split(ports[1], ",")))
	for i, p := range strings.Split(ports[1], ",") {
		_, port, _ := strings.Cut(free[i], ":")
		pairs = append(pairs, p, port)
	}
	for i, p := range strings.Split(ports[2], ",") {
		pairs = append(pairs, p, filepath.Join(tmp, "path"+string(rune('0'+i))))
	}
	script = replaceWords(script, pairs)
	want = strings.Split(replaceWords(strings.Join(want, "\n"), pairs), "\n")

	// A failing line stops the script; whatever still runs is stopped.
	full := "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", full)
	cmd.Dir = "../.." // the repository, as the README assumes
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	t.Logf("the tour took %s", time.Since(start))
	if err != nil {
		t.Fatalf("the tour failed: %v\nscript:\n%s\noutput:\n%s", err, script, out.String())
	}
	for _, w := range want {
		if !strings.Contains(out.String(), w) {
			t.Errorf("the tour does not print %s\noutput:\n%s", w, out.String())
		}
	}
	if _, err := os.Stat(filepath.Join(tmp, "path0")); !os.IsNotExist(err) {
		t.Errorf("the tour left its data dir behind: %v", err)
	}
}

// tourScript returns the sh blocks between the tour's markers and the
// outputs they promise (the "# → " lines).
func tourScript(t *testing.T, readme string) (string, []string) {
	t.Helper()
	loc := tourMarker.FindStringIndex(readme)
	end := strings.Index(readme, "<!-- /tour-test -->")
	if loc == nil || end < loc[1] {
		t.Fatal("README.md has no tour-test markers")
	}
	var script bytes.Buffer
	var want []string
	in := false
	for _, line := range strings.Split(readme[loc[1]:end], "\n") {
		switch {
		case !in && strings.TrimSpace(line) == "```sh":
			in = true
		case in && strings.TrimSpace(line) == "```":
			in = false
		case in:
			script.WriteString(line + "\n")
			if w, ok := strings.CutPrefix(strings.TrimSpace(line), "# → "); ok {
				want = append(want, w)
			}
		}
	}
	if script.Len() == 0 || len(want) == 0 {
		t.Fatal("the tour has no commands or no promised output")
	}
	return script.String(), want
}

// replaceWords replaces each old with its new (pairs: old, new, ...) where
// it stands as a whole word or path.
func replaceWords(s string, pairs []string) string {
	for i := 0; i+1 < len(pairs); i += 2 {
		re := regexp.MustCompile(`(^|[^\w/.-])` + regexp.QuoteMeta(pairs[i]) + `\b`)
		s = re.ReplaceAllString(s, "${1}"+strings.ReplaceAll(pairs[i+1], "$", "$$"))
	}
	return s
}
