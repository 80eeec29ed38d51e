package memory_test

import (
	"testing"
	"time"

	"github.com/fabricrt/fabric/memory"
)

func TestLeases(t *testing.T) {
	b := newBackend(t, memory.Options{})
	l := b.Leases()
	ctx := ctxT(t)
	acquire := func(name, holder string, ttl time.Duration) bool {
		t.Helper()
		ok, err := l.Acquire(ctx, name, holder, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !acquire("pg:chan", "a", time.Hour) || acquire("pg:chan", "b", time.Hour) {
		t.Fatal("the lease is not exclusive")
	}
	if !acquire("pg:chan", "a", time.Hour) {
		t.Fatal("the holder could not refresh")
	}
	if err := l.Release(ctx, "pg:chan", "b"); err != nil { // not b's: nothing happens
		t.Fatal(err)
	}
	if l.Holder("pg:chan") != "a" {
		t.Fatal("a release by another holder removed the lease")
	}
	if err := l.Release(ctx, "pg:chan", "a"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if !acquire("pg:chan", "b", 30*time.Millisecond) {
		t.Fatal("b could not take a released lease")
	}
	waitFor(t, "b's lease to expire", func() bool { return acquire("pg:chan", "a", time.Hour) })
	if el := time.Since(start); el < 30*time.Millisecond {
		t.Fatalf("b's lease ended after %v, before its ttl", el)
	}
	if _, err := l.Acquire(ctx, "x", "a", 0); err == nil {
		t.Fatal("a zero ttl was accepted")
	}
}
