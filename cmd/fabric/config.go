package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/fabricrt/fabric/admission"

	"github.com/fabricrt/fabric/server"
	"go.yaml.in/yaml/v3"
)

// applyConfig sets c from a YAML config file: every key of the settings
// table (nested: "http.listen" is listen under http), and topics, a list
// of topic policies appended to c.Topics. Keys skip says were given on the
// command line are left alone. An unknown key, a repeated key or a value of
// the wrong kind is an error naming the file, the line and the key.
func applyConfig(path string, data []byte, c *serveConfig, skip func(*setting) bool) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return nil // an empty file
	}
	cf := &configFile{path: path, c: c, skip: skip, byKey: map[string]*setting{}, groups: map[string]bool{}}
	for i := range settings {
		s := &settings[i]
		if s.key == "" {
			continue
		}
		cf.byKey[s.key] = s
		parts := strings.Split(s.key, ".")
		for j := 1; j < len(parts); j++ {
			cf.groups[strings.Join(parts[:j], ".")] = true
		}
	}
	return cf.mapping(deref(doc.Content[0]), "")
}

type configFile struct {
	path   string
	c      *serveConfig
	skip   func(*setting) bool
	byKey  map[string]*setting
	groups map[string]bool // keys that hold a mapping of keys
}

func (cf *configFile) errorf(n *yaml.Node, format string, args ...any) error {
	return fmt.Errorf("%s:%d: %s", cf.path, n.Line, fmt.Sprintf(format, args...))
}

func deref(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

// mapping applies the keys of m, which sits at prefix ("" or "http.").
func (cf *configFile) mapping(m *yaml.Node, prefix string) error {
	if m.Kind != yaml.MappingNode {
		where := "the top level"
		if prefix != "" {
			where = strings.TrimSuffix(prefix, ".")
		}
		return cf.errorf(m, "%s must be a mapping of keys", where)
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], deref(m.Content[i+1])
		key := prefix + k.Value
		if line, dup := seen[k.Value]; dup {
			return cf.errorf(k, "key %q repeats (first at line %d)", key, line)
		}
		seen[k.Value] = k.Line
		switch {
		case key == "topics":
			if err := cf.topics(v); err != nil {
				return err
			}
		case key == "admission.classes":
			if err := cf.classes(v); err != nil {
				return err
			}
		case cf.byKey[key] != nil:
			s := cf.byKey[key]
			if cf.skip(s) {
				continue
			}
			if err := cf.set(v, key, s.bind(cf.c)); err != nil {
				return err
			}
		case cf.groups[key]:
			if err := cf.mapping(v, key+"."); err != nil {
				return err
			}
		default:
			msg := fmt.Sprintf("unknown key %q", key)
			if near := cf.nearest(key); near != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", near)
			}
			return cf.errorf(k, "%s", msg)
		}
	}
	return nil
}

// set gives v (a scalar, or a list for list settings) to val.
func (cf *configFile) set(v *yaml.Node, key string, val value) error {
	switch v.Kind {
	case yaml.ScalarNode:
		if v.Tag == "!!null" {
			return nil // "key:" with no value keeps the default
		}
		if err := val.Set(v.Value); err != nil {
			return cf.errorf(v, "%s: %v", key, err)
		}
	case yaml.SequenceNode:
		ls, ok := val.(listSetter)
		if !ok {
			return cf.errorf(v, "%s: want a single value, not a list", key)
		}
		var items []string
		for _, it := range v.Content {
			it = deref(it)
			if it.Kind != yaml.ScalarNode {
				return cf.errorf(it, "%s: list items must be plain values", key)
			}
			items = append(items, it.Value)
		}
		if err := ls.SetList(items); err != nil {
			return cf.errorf(v, "%s: %v", key, err)
		}
	default:
		return cf.errorf(v, "%s: want a value, not a mapping", key)
	}
	return nil
}

// topics appends the policies of the topics list to c.Topics.
func (cf *configFile) topics(v *yaml.Node) error {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		return cf.errorf(v, "topics must be a list of policies (- pattern: ...)")
	}
	known := map[string]*topicKey{}
	for i := range topicKeys {
		known[topicKeys[i].key] = &topicKeys[i]
	}
	for i, item := range v.Content {
		item = deref(item)
		if item.Kind != yaml.MappingNode {
			return cf.errorf(item, "topics[%d] must be a mapping (pattern, persistent, ...)", i)
		}
		var p server.TopicPolicy
		seen := map[string]int{}
		for j := 0; j+1 < len(item.Content); j += 2 {
			k, val := item.Content[j], deref(item.Content[j+1])
			key := fmt.Sprintf("topics[%d].%s", i, k.Value)
			if line, dup := seen[k.Value]; dup {
				return cf.errorf(k, "key %q repeats (first at line %d)", key, line)
			}
			seen[k.Value] = k.Line
			tk := known[k.Value]
			if tk == nil {
				names := make([]string, 0, len(topicKeys))
				for _, t := range topicKeys {
					names = append(names, t.key)
				}
				return cf.errorf(k, "unknown key %q (a topic policy has %s)", key, strings.Join(names, ", "))
			}
			if err := cf.set(val, key, tk.bind(&p)); err != nil {
				return err
			}
		}
		if strings.TrimSpace(p.Pattern) == "" {
			return cf.errorf(item, "topics[%d]: pattern is required", i)
		}
		cf.c.Topics = append(cf.c.Topics, p)
	}
	return nil
}

// classes appends the admission classes of the admission.classes list.
func (cf *configFile) classes(v *yaml.Node) error {
	if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		return cf.errorf(v, "admission.classes must be a list of classes (- name: ...)")
	}
	known := map[string]*classKey{}
	for i := range classKeys {
		known[classKeys[i].key] = &classKeys[i]
	}
	for i, item := range v.Content {
		item = deref(item)
		if item.Kind != yaml.MappingNode {
			return cf.errorf(item, "admission.classes[%d] must be a mapping (name, reject_on, ...)", i)
		}
		var c admission.ClassConfig
		seen := map[string]int{}
		for j := 0; j+1 < len(item.Content); j += 2 {
			k, val := item.Content[j], deref(item.Content[j+1])
			key := fmt.Sprintf("admission.classes[%d].%s", i, k.Value)
			if line, dup := seen[k.Value]; dup {
				return cf.errorf(k, "key %q repeats (first at line %d)", key, line)
			}
			seen[k.Value] = k.Line
			ck := known[k.Value]
			if ck == nil {
				names := make([]string, 0, len(classKeys))
				for _, c := range classKeys {
					names = append(names, c.key)
				}
				return cf.errorf(k, "unknown key %q (an admission class has %s)", key, strings.Join(names, ", "))
			}
			if err := cf.set(val, key, ck.bind(&c)); err != nil {
				return err
			}
		}
		if strings.TrimSpace(c.Name) == "" {
			return cf.errorf(item, "admission.classes[%d]: name is required", i)
		}
		cf.c.Admission.Classes = append(cf.c.Admission.Classes, c)
	}
	return nil
}

// nearest returns the known key closest to key when it is close enough to
// be a typo.
func (cf *configFile) nearest(key string) string {
	keys := make([]string, 0, len(cf.byKey)+len(cf.groups)+1)
	for k := range cf.byKey {
		keys = append(keys, k)
	}
	for k := range cf.groups {
		keys = append(keys, k)
	}
	keys = append(keys, "topics", "admission.classes")
	sort.Strings(keys)
	best, bestD := "", 3
	for _, k := range keys {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
