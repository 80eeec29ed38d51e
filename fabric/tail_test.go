package fabric

import (
	"slices"
	"testing"
)

func seqsOf(ms []*Message) []uint64 {
	var out []uint64
	for _, m := range ms {
		out = append(out, m.Seq)
	}
	return out
}

func TestTail(t *testing.T) {
	tl := &tail{cap: 3, base: UnknownSeq}
	msg := func(seq uint64) *Message { return &Message{Seq: seq} }
	if _, ok, _ := tl.since(0, "e1"); ok {
		t.Fatal("an empty tail answered")
	}
	tl.add(msg(5), 2) // covers everything after 2
	tl.add(msg(9), 5)
	if _, ok, unchecked := tl.since(2, "e1"); ok || !unchecked {
		t.Fatalf("a chain no resume has checked answered (%v) or was not reported unchecked (%v)", ok, unchecked)
	}
	tl.adopt("e1", Position{Seq: 9, Epoch: "e1"})
	check := func(since uint64, want []uint64, wantOK bool) {
		t.Helper()
		got, ok, _ := tl.since(since, "e1")
		if ok != wantOK || ok && !slices.Equal(seqsOf(got), want) {
			t.Fatalf("since(%d) = %v, %v; want %v, %v", since, seqsOf(got), ok, want, wantOK)
		}
	}
	check(2, []uint64{5, 9}, true)
	check(5, []uint64{9}, true)
	check(9, nil, true)
	check(1, nil, false) // before the chain
	check(3, nil, false) // not a sequence of this topic
	check(12, nil, false)

	tl.add(msg(11), 9)
	tl.add(msg(14), 11) // evicts 5: the chain now starts after 5
	check(2, nil, false)
	check(5, []uint64{9, 11, 14}, true)
	check(11, []uint64{14}, true)

	tl.add(msg(20), 17) // a gap (17 never arrived): start again after 17
	check(14, nil, false)
	check(17, []uint64{20}, true)

	tl.add(msg(21), UnknownSeq)
	check(20, nil, false)

	// The store was wiped: a resume in the new epoch empties the chain.
	tl.add(msg(22), 21)
	if _, ok, _ := tl.since(21, "e2"); ok {
		t.Fatal("a chain of the old epoch answered in the new one")
	}
	tl.add(msg(1), 0) // the new incarnation's first message
	tl.add(msg(2), 1)
	if got, ok, _ := tl.since(0, "e2"); !ok || !slices.Equal(seqsOf(got), []uint64{1, 2}) {
		t.Fatalf("new epoch: since(0) = %v, %v", seqsOf(got), ok)
	}

	// An unchecked chain that reaches past the store's last message (a wipe
	// restarted the sequences before any resume saw it) is not adopted.
	old := &tail{cap: 3, base: UnknownSeq}
	old.add(msg(40), 39)
	old.add(msg(41), 40)
	old.adopt("e3", Position{Seq: 2, Epoch: "e3"})
	if _, ok, _ := old.since(39, "e3"); ok {
		t.Fatal("a chain ahead of the store was adopted")
	}
}
