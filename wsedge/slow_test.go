package wsedge_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge"
	"github.com/gobwas/ws"
	dto "github.com/prometheus/client_model/go"
)

// countingReader reads envelopes {"...","data":[N,...]} and checks N = 0,1,2,...
func countingReader(t *testing.T, nc net.Conn, br *bufio.Reader, n int, progress *atomic.Int64, done chan<- error) {
	next := 0
	for next < n {
		h, err := ws.ReadHeader(br)
		if err != nil {
			done <- fmt.Errorf("after %d messages: %w", next, err)
			return
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(br, p); err != nil {
			done <- err
			return
		}
		if h.OpCode != ws.OpText {
			continue
		}
		i := bytes.Index(p, []byte(`"data":[`)) + len(`"data":[`)
		j := bytes.IndexByte(p[i:], ',')
		got, err := strconv.Atoi(string(p[i : i+max(j, 0)]))
		if err != nil || got != next {
			done <- fmt.Errorf("message %d arrived as %.60q", next, p)
			return
		}
		next++
		progress.Store(int64(next))
	}
	done <- nil
}

func dialSubscribed(t *testing.T, inst *fabrictest.Instance, topic string, rcvbuf int) (net.Conn, *bufio.Reader) {
	t.Helper()
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Origin": {inst.HTTP.URL}}), Timeout: 5 * time.Second}
	if rcvbuf > 0 {
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
		}}
		d.NetDial = func(ctx context.Context, n, a string) (net.Conn, error) { return nd.DialContext(ctx, n, a) }
	}
	nc, br, _, err := d.Dial(context.Background(), inst.WSURL)
	if err != nil {
		t.Fatal(err)
	}
	if br == nil {
		br = bufio.NewReader(nc)
	}
	t.Cleanup(func() { nc.Close() })
	f := ws.NewTextFrame([]byte(`{"type":"subscribe","topic":"` + topic + `","ref":1}`))
	if err := ws.WriteFrame(nc, ws.MaskFrame(f)); err != nil {
		t.Fatal(err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	h, err := ws.ReadHeader(br)
	if err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, h.Length)
	if _, err := io.ReadFull(br, ack); err != nil || !bytes.Contains(ack, []byte("subscribed")) {
		t.Fatalf("subscribe ack: %s %v", ack, err)
	}
	_ = nc.SetReadDeadline(time.Time{})
	return nc, br
}

// TestSlowConsumer: one client among 100 stops reading. The other 99 still
// get all 10,000 messages, in order, promptly; the stalled one's queue never
// exceeds MaxBackpressure, and the excess is dropped and counted.
//
// The publisher keeps at most a window of messages ahead of the slowest
// healthy reader: a burst that outruns even healthy readers by more than
// MaxBackpressure is dropped for them too (that is the policy), and this
// test is about one stalled client not hurting the others. If the stalled
// client slowed the others, they would never catch up and the test times out.
func TestSlowConsumer(t *testing.T) {
	modes(t, func(t *testing.T, perConn bool) {
		const (
			subs     = 100
			messages = 10_000
			maxBP    = wsedge.DefaultMaxBackpressure
			window   = 300 // messages; ~300 KiB, well under maxBP
		)
		inst := instance(t, perConn, wsedge.Options{MaxBackpressure: maxBP})
		stalled, _ := dialSubscribed(t, inst, "feed", 4096) // subscribed, then never read
		_ = stalled
		done := make(chan error, subs-1)
		progress := make([]atomic.Int64, subs-1)
		for i := range subs - 1 {
			nc, br := dialSubscribed(t, inst, "feed", 0)
			go countingReader(t, nc, br, messages, &progress[i], done)
		}
		slowest := func() int64 {
			m := int64(messages)
			for i := range progress {
				m = min(m, progress[i].Load())
			}
			return m
		}
		var stalledClient *fabric.Client
		inst.Node.Each(func(c *fabric.Client) bool {
			if stalledClient == nil || c.ID() < stalledClient.ID() {
				stalledClient = c
			}
			return true
		})
		buffered := stalledClient.Transport().(interface{ Buffered() int })

		var peak int
		var mu sync.Mutex
		stop := make(chan struct{})
		go func() { // sample the stalled connection's queue while publishing
			for {
				select {
				case <-stop:
					return
				default:
				}
				b := buffered.Buffered()
				mu.Lock()
				peak = max(peak, b)
				mu.Unlock()
				time.Sleep(time.Millisecond)
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		pad := bytes.Repeat([]byte("x"), 1000) // 10 MB in all: more than kernel buffers hold
		start := time.Now()
		for i := range messages {
			for int64(i)-slowest() > window {
				if ctx.Err() != nil {
					t.Fatalf("healthy readers stuck at %d of %d published", slowest(), i)
				}
				time.Sleep(100 * time.Microsecond)
			}
			env := fabric.AppendEnvelope(nil, "feed", "tick", []byte(`[`+strconv.Itoa(i)+`,"`+string(pad)+`"]`))
			if _, err := inst.Node.PublishEnvelope(ctx, "feed", env); err != nil {
				t.Fatal(err)
			}
		}
		for range subs - 1 {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-ctx.Done():
				t.Fatal("readers did not get every message in 60s")
			}
		}
		elapsed := time.Since(start)
		close(stop)
		mu.Lock()
		defer mu.Unlock()
		var m dto.Metric
		_ = inst.Node.Metrics().Dropped.WithLabelValues("backpressure").Write(&m)
		dropped := m.GetCounter().GetValue()
		t.Logf("99 readers × %d messages in %s; stalled queue peak %d bytes (limit %d); %v dropped",
			messages, elapsed, peak, maxBP, dropped)
		if peak > maxBP {
			t.Fatalf("stalled connection buffered %d bytes, over MaxBackpressure %d", peak, maxBP)
		}
		if dropped == 0 {
			t.Fatal("nothing was dropped for the stalled connection: backpressure never engaged")
		}
	})
}
