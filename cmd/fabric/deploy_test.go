package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

const deployDocPath = "../../docs/deploy.md"

var (
	fenceRE = regexp.MustCompile("(?s)```(yaml|sh|ini)\n(.*?)```")
	flagRE  = regexp.MustCompile(`(?:^|[\s"'])--([a-z][a-z0-9-]*)`)
	envRE   = regexp.MustCompile(`\bFABRIC_[A-Z0-9_]+\b`)
)

// TestDeployDoc: every manifest and config file of docs/deploy.md parses,
// the config files are valid config files, and every flag (and FABRIC_*
// variable) the manifests, the systemd unit and the commands name exists in
// the settings table. The Kubernetes manifests have what deploy.md says
// they have: a headless Service publishing unready pods, a StatefulSet
// whose pods start in parallel with /readyz and /healthz probes and a
// preStop pause, and a PodDisruptionBudget.
func TestDeployDoc(t *testing.T) {
	raw, err := os.ReadFile(deployDocPath)
	if err != nil {
		t.Fatal(err)
	}
	flags := map[string]bool{}
	envs := map[string]bool{"FABRIC_KEY": true} // a shell variable of the example, not a setting
	for _, s := range settings {
		flags[s.flag] = true
		envs[s.env()] = true
	}
	checkFlags := func(where, text string) int {
		n := 0
		for _, m := range flagRE.FindAllStringSubmatch(text, -1) {
			n++
			if !flags[m[1]] {
				t.Errorf("%s names --%s, which fabric serve does not have", where, m[1])
			}
		}
		for _, e := range envRE.FindAllString(text, -1) {
			if !envs[e] {
				t.Errorf("%s names %s, which is no setting's environment variable", where, e)
			}
		}
		return n
	}
	kinds := map[string]*yaml.Node{}
	var manifests []*yaml.Node
	nflags, nblocks := 0, 0
	for i, m := range fenceRE.FindAllStringSubmatch(string(raw), -1) {
		lang, body := m[1], m[2]
		where := fmt.Sprintf("docs/deploy.md block %d (%s)", i+1, lang)
		nblocks++
		switch lang {
		case "yaml":
			if strings.HasPrefix(body, "# fabric.yaml") {
				c := newServeConfig()
				if err := applyConfig(where, []byte(body), c, func(*setting) bool { return false }); err != nil {
					t.Errorf("%s: %v", where, err)
				} else if _, err := c.Policies(); err != nil {
					t.Errorf("%s: %v", where, err)
				}
				continue
			}
			dec := yaml.NewDecoder(bytes.NewReader([]byte(body)))
			for {
				var doc yaml.Node
				if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
					break
				} else if err != nil {
					t.Fatalf("%s does not parse: %v", where, err)
				}
				walkScalars(&doc, func(s string) { nflags += checkFlags(where, s) })
				if k := mapValue(doc.Content[0], "kind"); k != nil {
					kinds[k.Value] = doc.Content[0]
					manifests = append(manifests, doc.Content[0])
				}
			}
		default:
			// Commands: continuation lines joined; only `fabric serve`
			// lines name its flags.
			text := strings.ReplaceAll(body, "\\\n", " ")
			for _, line := range strings.Split(text, "\n") {
				if strings.Contains(line, "fabric serve") {
					nflags += checkFlags(where, line)
				}
			}
		}
	}
	t.Logf("%d blocks, %d flags checked", nblocks, nflags)
	if nflags < 40 {
		t.Errorf("only %d flags found in docs/deploy.md: the extraction is broken", nflags)
	}
	// The Kubernetes objects deploy.md describes.
	for _, k := range []string{"Service", "StatefulSet", "PodDisruptionBudget"} {
		if kinds[k] == nil {
			t.Fatalf("docs/deploy.md has no %s", k)
		}
	}
	sts := kinds["StatefulSet"]
	spec := mapValue(sts, "spec")
	if v := mapValue(spec, "podManagementPolicy"); v == nil || v.Value != "Parallel" {
		t.Error("the StatefulSet must start its pods in parallel (the first is not ready alone)")
	}
	container := mapValue(mapValue(mapValue(spec, "template"), "spec"), "containers").Content[0]
	args := mapValue(container, "args")
	if args == nil || args.Content[0].Value != "serve" {
		t.Error("the container's args must start with serve")
	}
	for probe, path := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz"} {
		p := mapValue(mapValue(container, probe), "httpGet")
		if p == nil || mapValue(p, "path").Value != path {
			t.Errorf("%s must GET %s", probe, path)
		}
	}
	if mapValue(mapValue(container, "lifecycle"), "preStop") == nil {
		t.Error("no preStop pause")
	}
	headless := false
	for _, doc := range manifests {
		s := mapValue(doc, "spec")
		if ip, p := mapValue(s, "clusterIP"), mapValue(s, "publishNotReadyAddresses"); ip != nil && ip.Value == "None" && p != nil && p.Value == "true" {
			headless = true
		}
	}
	if !headless {
		t.Error("no headless Service publishing not-ready addresses for the routes")
	}
}

// walkScalars calls f with every scalar value under n.
func walkScalars(n *yaml.Node, f func(string)) {
	if n == nil {
		return
	}
	if n.Kind == yaml.ScalarNode {
		f(n.Value)
	}
	for _, c := range n.Content {
		walkScalars(c, f)
	}
}

// mapValue returns the value of key in the mapping m (nil if absent).
func mapValue(m *yaml.Node, key string) *yaml.Node {
	if m == nil {
		return nil
	}
	if m.Kind == yaml.DocumentNode && len(m.Content) > 0 {
		m = m.Content[0]
	}
	if m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}
