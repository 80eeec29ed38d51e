package sse_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/jetstream"
)

// event is one SSE event as a browser's EventSource sees it.
type event struct {
	ID    string // the stream's last id so far (EventSource keeps it)
	Name  string
	Data  string
	Topic string
	Seq   uint64
}

// stream is a raw SSE reader: what EventSource does, without a browser.
type stream struct {
	resp   *http.Response
	rd     *bufio.Reader
	lastID string
	cancel context.CancelFunc
}

func open(t *testing.T, rawURL, lastEventID string, h http.Header) (*stream, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	for k, v := range h {
		req.Header[k] = v
	}
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	if req.Header.Get("Origin") == "" { // what a same-origin EventSource sends
		req.Header.Set("Origin", "http://"+req.URL.Host)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	s := &stream{resp: resp, rd: bufio.NewReader(resp.Body), lastID: lastEventID, cancel: cancel}
	t.Cleanup(s.close)
	return s, nil
}

func (s *stream) close() { s.cancel(); s.resp.Body.Close() }

// next reads the next event (heartbeats skipped).
func (s *stream) next(t *testing.T, d time.Duration) event {
	t.Helper()
	type res struct {
		e   event
		err error
	}
	ch := make(chan res, 1)
	go func() {
		var e event
		var data []string
		for {
			line, err := s.rd.ReadString('\n')
			if err != nil {
				ch <- res{err: err}
				return
			}
			line = strings.TrimRight(line, "\n")
			switch {
			case line == "" && (len(data) > 0 || e.Name != ""):
				e.Data = strings.Join(data, "\n")
				var env struct {
					Topic string `json:"topic"`
					Seq   uint64 `json:"seq"`
				}
				_ = json.Unmarshal([]byte(e.Data), &env)
				e.Topic, e.Seq = env.Topic, env.Seq
				e.ID = s.lastID
				ch <- res{e: e}
				return
			case strings.HasPrefix(line, "id: "):
				s.lastID = strings.TrimPrefix(line, "id: ")
			case strings.HasPrefix(line, "event: "):
				e.Name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				data = append(data, strings.TrimPrefix(line, "data: "))
			}
		}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("reading the stream: %v", r.err)
		}
		return r.e
	case <-time.After(d):
		t.Fatalf("no event within %s", d)
		return event{}
	}
}

// until reads events until one on topic with seq want arrived, returning
// the seqs of topic's messages on the way.
func (s *stream) until(t *testing.T, topics []string, want map[string]uint64) map[string][]uint64 {
	t.Helper()
	got := map[string][]uint64{}
	deadline := time.Now().Add(20 * time.Second)
	for {
		done := true
		for _, topic := range topics {
			if l := got[topic]; len(l) == 0 || l[len(l)-1] < want[topic] {
				done = false
			}
		}
		if done {
			return got
		}
		e := s.next(t, time.Until(deadline))
		if e.Seq > 0 && slices.Contains(topics, e.Topic) {
			got[e.Topic] = append(got[e.Topic], e.Seq)
		}
	}
}

// TestResumeWithLastEventIDAcrossRestart: a stream on two persistent topics
// and a plain one; the instance restarts on the same data dir; messages are
// published before, during the gap and after; the stream comes back with
// the Last-Event-ID it had and gets exactly what it missed, then live
// messages, on both topics.
func TestResumeWithLastEventIDAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	opts := fabrictest.Options{
		Embed:  embed.Options{DataDir: dir},
		Prefix: fabrictest.TestPrefix(t),
		Node:   fabric.Config{Persistent: fabric.MatchTopics([]string{"log:*"})},
		History: func(i *fabrictest.Instance) (fabric.History, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return jetstream.NewHistory(ctx, i.JS, jetstream.HistoryOptions{Prefix: i.Broker.Prefix(), Eager: true})
		},
	}
	topics := []string{"log:a", "log:b c"} // a space: ids must be encoded
	q := url.Values{"topic": append(slices.Clone(topics), "plain")}.Encode()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	publish := func(inst *fabrictest.Instance, n int) map[string][]uint64 {
		out := map[string][]uint64{}
		for i := range n {
			for _, topic := range topics {
				seq, err := inst.Node.Publish(ctx, topic, "n", i)
				if err != nil {
					t.Fatal(err)
				}
				out[topic] = append(out[topic], seq)
			}
			if _, err := inst.Node.Publish(ctx, "plain", "n", i); err != nil {
				t.Fatal(err)
			}
		}
		return out
	}

	inst := fabrictest.NewInstance(t, opts)
	s, err := open(t, inst.SSEURL+"?"+q, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if e := s.next(t, 5*time.Second); e.Name != "session" {
		t.Fatalf("first event %+v, want session", e)
	}
	for range 3 { // subscribed acks
		if e := s.next(t, 5*time.Second); e.Name != "subscribed" {
			t.Fatalf("got %+v, want the subscribe acks", e)
		}
	}
	first := publish(inst, 5)
	last := map[string]uint64{}
	for _, topic := range topics {
		last[topic] = first[topic][len(first[topic])-1]
	}
	got := s.until(t, topics, last)
	for _, topic := range topics {
		if !slices.Equal(got[topic], first[topic]) {
			t.Fatalf("%s before the restart: %v, want %v", topic, got[topic], first[topic])
		}
	}
	lastID := s.lastID
	if lastID == "" {
		t.Fatal("no id: line on persistent messages")
	}
	s.close()

	missed := publish(inst, 3) // while the client is away
	inst.Stop()
	inst = fabrictest.NewInstance(t, opts)
	missedAfter := publish(inst, 2) // after the restart, before it is back

	s, err = open(t, inst.SSEURL+"?"+q, lastID, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]uint64{}
	for _, topic := range topics {
		want[topic] = append(slices.Clone(missed[topic]), missedAfter[topic]...)
		last[topic] = want[topic][len(want[topic])-1]
	}
	got = s.until(t, topics, last)
	for _, topic := range topics {
		if !slices.Equal(got[topic], want[topic]) {
			t.Fatalf("%s after the restart with Last-Event-ID %q: %v, want exactly %v", topic, lastID, got[topic], want[topic])
		}
	}
	live := publish(inst, 1)
	for _, topic := range topics {
		last[topic] = live[topic][0]
	}
	got = s.until(t, topics, last)
	for _, topic := range topics {
		if !slices.Equal(got[topic], live[topic]) {
			t.Fatalf("%s live after the resume: %v, want %v", topic, got[topic], live[topic])
		}
	}
	// The stream's id names both topics with their epochs.
	v, err := url.ParseQuery(s.lastID)
	if err != nil {
		t.Fatal(err)
	}
	for _, topic := range topics {
		if seq, epoch, ok := strings.Cut(v.Get(topic), ":"); !ok || seq != fmt.Sprint(last[topic]) || epoch == "" {
			t.Fatalf("id %q: %s is %q, want %d:<epoch>", s.lastID, topic, v.Get(topic), last[topic])
		}
	}
}

// TestRefusals: every bad request gets a clear status and message.
func TestRefusals(t *testing.T) {
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: fabric.Config{Hooks: fabric.Hooks{Connect: func(r *http.Request) (any, error) {
		if r.Header.Get("X-Deny") != "" {
			return nil, fabric.ErrUnauthorized
		}
		return "u", nil
	}}}})
	many := url.Values{}
	for i := range 65 {
		many.Add("topic", fmt.Sprint("t", i))
	}
	for name, tc := range map[string]struct {
		url    string
		header http.Header
		status int
	}{
		"too many topics":    {"?" + many.Encode(), nil, 400},
		"bad topic":          {"?topic=" + url.QueryEscape("a\"b"), nil, 400},
		"bare since, 2 tops": {"?topic=a&topic=b&since=3", nil, 400},
		"bad since":          {"?topic=a&since=" + url.QueryEscape("a=x:e"), nil, 400},
		"connect hook":       {"?topic=a", http.Header{"X-Deny": {"1"}}, 401},
		"foreign origin":     {"?topic=a", http.Header{"Origin": {"http://evil.example"}}, 403},
	} {
		_, err := open(t, inst.SSEURL+tc.url, "", tc.header)
		if err == nil || !strings.HasPrefix(err.Error(), fmt.Sprint(tc.status)) {
			t.Errorf("%s: %v, want %d", name, err, tc.status)
		}
	}
	resp, err := http.Post(inst.SSEURL+"?session=nope", "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST to an unknown session: %d, want 404", resp.StatusCode)
	}
	s, err := open(t, inst.SSEURL+"?topic=a", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	e := s.next(t, 5*time.Second)
	var sess struct{ Session string }
	if err := json.Unmarshal([]byte(e.Data), &sess); err != nil || sess.Session == "" {
		t.Fatalf("session event %+v", e)
	}
	resp, err = http.Post(inst.SSEURL+"?session="+sess.Session, "application/json", strings.NewReader(strings.Repeat(" ", 17<<10)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("a 17 KiB frame: %d, want 413", resp.StatusCode)
	}
}
