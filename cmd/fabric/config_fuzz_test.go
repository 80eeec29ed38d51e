package main

import (
	"strings"
	"testing"
)

// FuzzConfigFile: any bytes given as a config file are applied or refused
// with an error that names the file; nothing panics, and a refusal of a
// parsed document points at a line.
func FuzzConfigFile(f *testing.F) {
	for _, s := range []string{
		"", "backend: nats\n", "http:\n  listen: 127.0.0.1:9000\n", "topics:\n  - pattern: \"chat:*\"\n    persistent: true\n",
		"http: [1, 2]\n", "nope: 1\n", "topics: {a: 1}\n", "topics:\n  - persistent: true\n", "admission:\n  classes:\n    - name: x\n      reject_on: [MEMORY]\n",
		"&a [*a]\n", "a: &a {b: *a}\n", "replay: {max_age: -1h}\n", "rate_limit: {rpc: 30/0s}\n", "\t\n", "http:\n  listen:\n", "? [a]\n: b\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, doc string) {
		c := newServeConfig()
		err := applyConfig("fuzz.yaml", []byte(doc), c, func(*setting) bool { return false })
		if err != nil && !strings.Contains(err.Error(), "fuzz.yaml") {
			t.Fatalf("error without the file's name: %v", err)
		}
	})
}
