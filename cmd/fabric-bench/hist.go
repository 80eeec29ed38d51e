package main

import (
	"math"
	"sync/atomic"
	"time"
)

// Latency histogram: log-linear buckets from 1µs to ~100s, 5% apart, with
// lock-free recording (one atomic add) and sharding to keep cores off each
// other's cache lines.
const (
	histBuckets = 400
	histGrowth  = 1.05
	histShards  = 16
)

var logGrowth = math.Log(histGrowth)

type hist struct {
	shards [histShards]struct {
		b [histBuckets]atomic.Uint64
		_ [64]byte
	}
}

func bucketOf(d time.Duration) int {
	us := float64(d) / float64(time.Microsecond)
	if us <= 1 {
		return 0
	}
	b := int(math.Log(us)/logGrowth) + 1
	return min(b, histBuckets-1)
}

// upperBound is the largest latency bucket b holds.
func upperBound(b int) time.Duration {
	return time.Duration(math.Pow(histGrowth, float64(b)) * float64(time.Microsecond))
}

func (h *hist) record(shard int, d time.Duration) {
	h.shards[shard%histShards].b[bucketOf(d)].Add(1)
}

// snapshot returns merged bucket counts.
func (h *hist) snapshot() []uint64 {
	out := make([]uint64, histBuckets)
	for i := range h.shards {
		for b := range out {
			out[b] += h.shards[i].b[b].Load()
		}
	}
	return out
}

// summary of merged counts.
type latency struct {
	Count uint64  `json:"count"`
	P50   float64 `json:"p50_ms"`
	P95   float64 `json:"p95_ms"`
	P99   float64 `json:"p99_ms"`
	Max   float64 `json:"max_ms"`
}

func summarize(counts []uint64) latency {
	var total uint64
	for _, c := range counts {
		total += c
	}
	l := latency{Count: total}
	if total == 0 {
		return l
	}
	q := func(p float64) float64 {
		want := uint64(math.Ceil(p * float64(total)))
		var seen uint64
		for b, c := range counts {
			seen += c
			if seen >= want {
				return ms(upperBound(b))
			}
		}
		return ms(upperBound(len(counts) - 1))
	}
	l.P50, l.P95, l.P99 = q(0.50), q(0.95), q(0.99)
	for b := len(counts) - 1; b >= 0; b-- {
		if counts[b] > 0 {
			l.Max = ms(upperBound(b))
			break
		}
	}
	return l
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

func addCounts(dst, src []uint64) {
	for i := range src {
		dst[i] += src[i]
	}
}

func subCounts(a, b []uint64) []uint64 {
	out := make([]uint64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}
