package fabric

import (
	"encoding/json"
	"sync"
	"testing"
	"time"
)

// recordingTransport keeps the payloads delivered and the close code.
type recordingTransport struct {
	mu     sync.Mutex
	frames []string
	code   int
	closed chan struct{}
}

func newRecordingTransport() *recordingTransport {
	return &recordingTransport{closed: make(chan struct{})}
}

func (r *recordingTransport) Deliver(m *Message) bool {
	r.mu.Lock()
	r.frames = append(r.frames, string(m.Payload))
	r.mu.Unlock()
	return true
}

func (r *recordingTransport) Close(code int, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.code == 0 {
		r.code = code
		close(r.closed)
	}
}

func (r *recordingTransport) find(typ string) (map[string]any, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.frames {
		var m map[string]any
		if json.Unmarshal([]byte(f), &m) == nil && m["type"] == typ {
			return m, true
		}
	}
	return nil, false
}

// token is user data that expires.
type token struct {
	user string
	exp  time.Time
}

func (t token) ExpiresAt() time.Time { return t.exp }
func (t token) UserID() string       { return t.user }

func waitFrame(t *testing.T, r *recordingTransport, typ string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if m, ok := r.find(typ); ok {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q frame; got %q", typ, r.frames)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestTokenExpiryAndRefresh: a connection whose user data expires is asked
// to refresh, closed with 4401 when it does not, kept when it does; a token
// of another user, or one the hook refuses, is denied with its reason.
func TestTokenExpiryAndRefresh(t *testing.T) {
	refresh := func(c *Client, raw string) (any, error) {
		switch raw {
		case "bad":
			return nil, NewLiveError("INVALID_TOKEN", "bad signature")
		case "mallory":
			return nil, ErrTokenUserChanged
		}
		return token{user: "ada", exp: time.Now().Add(time.Hour)}, nil
	}
	n, err := NewNode(Config{Broker: nopBroker{}, Hooks: Hooks{Refresh: refresh}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()

	// Not refreshed: asked, then closed with 4401.
	lazy := newRecordingTransport()
	n.Connect(lazy, token{user: "bob", exp: time.Now().Add(300 * time.Millisecond)}, "test")
	if m := waitFrame(t, lazy, "refresh-needed"); m["exp"] == nil {
		t.Fatalf("refresh-needed without exp: %v", m)
	}
	select {
	case <-lazy.closed:
		if lazy.code != CloseTokenExpired {
			t.Fatalf("closed with %d, want %d", lazy.code, CloseTokenExpired)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("an expired token's connection stayed open")
	}

	// Refreshed: kept past the first expiry, with the new user data.
	tr := newRecordingTransport()
	c := n.Connect(tr, token{user: "ada", exp: time.Now().Add(300 * time.Millisecond)}, "test")
	for raw, reason := range map[string]string{"bad": "INVALID_TOKEN", "mallory": CodeForbidden} {
		n.HandleFrame(c, []byte(`{"type":"refresh","token":"`+raw+`","ref":1}`), false)
		if m := waitFrame(t, tr, "refresh-denied"); m["reason"] != reason {
			t.Fatalf("refresh %s: %v, want reason %s", raw, m, reason)
		}
		tr.mu.Lock()
		tr.frames = nil
		tr.mu.Unlock()
	}
	n.HandleFrame(c, []byte(`{"type":"refresh","token":"good","ref":2}`), false)
	if m := waitFrame(t, tr, "refreshed"); m["exp"] == nil || m["ref"] != float64(2) {
		t.Fatalf("refreshed answer %v", m)
	}
	select {
	case <-tr.closed:
		t.Fatalf("closed with %d after a refresh", tr.code)
	case <-time.After(600 * time.Millisecond):
	}
	if k, _ := UserKey(c.UserData()); k != "ada" {
		t.Fatalf("user after refresh %q", k)
	}
}
