package main

import (
	"flag"
	"os"
	"regexp"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the generated tables of docs/config.md")

const configDocPath = "../../docs/config.md"

// settingsTable is the markdown table of every setting, by section.
func settingsTable() string {
	c := newServeConfig()
	var b strings.Builder
	group := ""
	for _, s := range settings {
		if s.group != group {
			if group != "" {
				b.WriteString("\n")
			}
			group = s.group
			b.WriteString("**" + group + "**\n\n")
			b.WriteString("| key | flag | environment | default | meaning |\n|---|---|---|---|---|\n")
		}
		key := "—"
		if s.key != "" {
			key = "`" + s.key + "`"
		}
		def := s.bind(c).String()
		switch {
		case s.flag == "config":
			def = "—"
		case def == "":
			def = "(none)"
		default:
			def = "`" + def + "`"
		}
		b.WriteString("| " + key + " | `--" + s.flag + "` | `" + s.env() + "` | " + def + " | " + escapeCell(s.usage) + " |\n")
	}
	return b.String()
}

// topicKeysTable is the markdown table of a topics entry's keys.
func topicKeysTable() string {
	var b strings.Builder
	b.WriteString("| key | meaning |\n|---|---|\n")
	for _, k := range topicKeys {
		b.WriteString("| `" + k.key + "` | " + escapeCell(k.usage) + " |\n")
	}
	return b.String()
}

// classKeysTable is the markdown table of an admission class's keys.
func classKeysTable() string {
	var b strings.Builder
	b.WriteString("| key | meaning |\n|---|---|\n")
	for _, k := range classKeys {
		b.WriteString("| `" + k.key + "` | " + escapeCell(k.usage) + " |\n")
	}
	return b.String()
}

func escapeCell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

// TestConfigDoc: docs/config.md carries the tables generated from the
// settings table (go test ./cmd/fabric -run TestConfigDoc -update rewrites
// them), so it lists every key, flag, environment variable and default.
func TestConfigDoc(t *testing.T) {
	raw, err := os.ReadFile(configDocPath)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	for name, table := range map[string]string{"settings": settingsTable(), "topic-keys": topicKeysTable(), "class-keys": classKeysTable()} {
		re := regexp.MustCompile(`(?s)(<!-- ` + name + `:begin -->\n).*?(<!-- ` + name + `:end -->)`)
		if !re.MatchString(doc) {
			t.Fatalf("docs/config.md lacks the %s markers", name)
		}
		next := re.ReplaceAllLiteralString(doc, "<!-- "+name+":begin -->\n"+table+"<!-- "+name+":end -->")
		if next != doc && !*update {
			t.Errorf("docs/config.md's %s table is stale: go test ./cmd/fabric -run TestConfigDoc -update", name)
		}
		doc = next
	}
	if *update {
		if err := os.WriteFile(configDocPath, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range settings {
		for _, want := range []string{"`--" + s.flag + "`", s.env()} {
			if !strings.Contains(doc, want) {
				t.Errorf("docs/config.md lacks %s", want)
			}
		}
		if s.key != "" && !strings.Contains(doc, "`"+s.key+"`") {
			t.Errorf("docs/config.md lacks key %s", s.key)
		}
	}
	// Every YAML example in the doc is a valid config file.
	for i, m := range regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(doc, -1) {
		c := newServeConfig()
		if err := applyConfig("docs/config.md example", []byte(m[1]), c, func(*setting) bool { return false }); err != nil {
			t.Errorf("example %d: %v", i, err)
			continue
		}
		if _, err := c.Policies(); err != nil {
			t.Errorf("example %d: %v", i, err)
		}
	}
}
