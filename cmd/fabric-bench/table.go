package main

// fabric-bench table FILE...: the side-by-side tables of docs/benchmarks.md
// from --json results (bench/side-by-side.sh writes one file per run): one
// table per scenario (and publish path), a column per target, each cell
// the range over the runs.

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
)

// targetTitles are the column heads.
var targetTitles = map[string]string{
	targetFabric:     "Fabric",
	targetCentrifugo: "Centrifugo v6.9.1",
	targetNATS:       "NATS WebSocket (nats-server v2.15.2)",
}

func runTable(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: fabric-bench table RESULT.json...")
		return 2
	}
	groups := map[string]map[string][]*result{} // scenario[/via] → target → runs
	var order []string
	for _, name := range args {
		b, err := os.ReadFile(name)
		if err != nil {
			fmt.Fprintln(stderr, "fabric-bench table:", err)
			return 1
		}
		var r result
		if err := json.Unmarshal(b, &r); err != nil {
			fmt.Fprintf(stderr, "fabric-bench table: %s: %v\n", name, err)
			return 1
		}
		if r.Target == "" {
			r.Target = targetFabric
		}
		key := r.Scenario
		if r.Via != "" && r.Scenario == "fanout-many-topics" {
			key += " (publish " + viaTitle(r.Via) + ")"
		}
		if groups[key] == nil {
			groups[key] = map[string][]*result{}
			order = append(order, key)
		}
		col := r.Target
		if r.Options != "" {
			col += " (" + r.Options + ")"
		}
		groups[key][col] = append(groups[key][col], &r)
	}
	slices.Sort(order)
	for _, key := range order {
		writeTable(stdout, key, groups[key])
	}
	return 0
}

func viaTitle(via string) string {
	switch via {
	case "rpc":
		return "over a WebSocket"
	case "http":
		return "HTTP API"
	case "nats":
		return "NATS client"
	}
	return via
}

func writeTable(w io.Writer, key string, byTarget map[string][]*result) {
	var targets []string
	for _, t := range []string{targetFabric, targetCentrifugo, targetNATS} {
		for col := range byTarget {
			if col == t || strings.HasPrefix(col, t+" (") {
				targets = append(targets, col)
			}
		}
	}
	if len(targets) > 1 && targets[0] == targetFabric {
		slices.Sort(targets[1:]) // Fabric first, then the peers
	}
	fmt.Fprintf(w, "\n#### %s\n\n|  |", key)
	for _, t := range targets {
		name, opts, _ := strings.Cut(t, " (")
		title := targetTitles[name]
		if opts != "" {
			title += " (" + opts
		}
		fmt.Fprintf(w, " %s |", title)
	}
	fmt.Fprint(w, "\n|---|")
	for range targets {
		fmt.Fprint(w, "---|")
	}
	fmt.Fprintln(w)
	any := func(f func(*result) bool) bool {
		for _, t := range targets {
			for _, r := range byTarget[t] {
				if f(r) {
					return true
				}
			}
		}
		return false
	}
	row := func(name string, f func(*result) float64, format string) {
		fmt.Fprintf(w, "| %s |", name)
		for _, t := range targets {
			var vs []float64
			for _, r := range byTarget[t] {
				vs = append(vs, f(r))
			}
			fmt.Fprintf(w, " %s |", span(vs, format))
		}
		fmt.Fprintln(w)
	}
	publishes := any(func(r *result) bool { return r.Publishes > 0 })
	fmt.Fprintf(w, "| runs |")
	for _, t := range targets {
		fmt.Fprintf(w, " %d |", len(byTarget[t]))
	}
	fmt.Fprintln(w)
	if publishes {
		row("deliveries/s", func(r *result) float64 { return r.DeliveriesPerS }, "%.0f")
		row("publishes/s", func(r *result) float64 { return r.PublishRate }, "%.0f")
		row("missing deliveries", func(r *result) float64 { return float64(r.Missing) }, "%.0f")
		row("latency p50 (ms)", func(r *result) float64 { return r.Latency.P50 }, "%.1f")
		row("latency p99 (ms)", func(r *result) float64 { return r.Latency.P99 }, "%.1f")
	}
	if any(func(r *result) bool { return r.Floor != nil }) {
		row("floor (ms)", func(r *result) float64 { return floorField(r, func(f *floor) float64 { return f.FloorMS }) }, "%.1f")
		row("p99 ÷ floor", func(r *result) float64 { return floorField(r, func(f *floor) float64 { return f.P99Ratio }) }, "%.2f")
	}
	if any(func(r *result) bool { return r.RSSPerConnKiB > 0 }) {
		row("server RSS per connection (KiB)", func(r *result) float64 {
			if r.RSSPerConnKiB == 0 { // not measured (older results, or no connection)
				return math.NaN()
			}
			return r.RSSPerConnKiB
		}, "%.1f")
	}
	row("server RSS (MiB)", func(r *result) float64 { return r.ServerRSSMiB }, "%.0f")
	row("handshakes/s", func(r *result) float64 { return r.HandshakesPerS }, "%.0f")
	row("server CPU (% of a core)", func(r *result) float64 { return r.ServerCPU }, "%.0f")
	row("load tool CPU (% of a core)", func(r *result) float64 { return r.ToolCPU }, "%.0f")
	fmt.Fprintf(w, "| load average (1 min) at start |")
	for _, t := range targets {
		var vs []float64
		for _, r := range byTarget[t] {
			var l float64
			if f := strings.Fields(r.Load); len(f) > 0 {
				fmt.Sscan(f[0], &l)
			}
			vs = append(vs, l)
		}
		fmt.Fprintf(w, " %s |", span(vs, "%.2f"))
	}
	fmt.Fprintln(w)
}

func floorField(r *result, f func(*floor) float64) float64 {
	if r.Floor == nil {
		return math.NaN()
	}
	return f(r.Floor)
}

// span formats the range of vs ("a–b", or "a" when they agree), NaNs
// left out.
func span(vs []float64, format string) string {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vs {
		if math.IsNaN(v) {
			continue
		}
		lo, hi = math.Min(lo, v), math.Max(hi, v)
	}
	if math.IsInf(lo, 1) {
		return "–"
	}
	a, b := fmt.Sprintf(format, lo), fmt.Sprintf(format, hi)
	if a == b {
		return a
	}
	return a + "–" + b
}
