package wsclient

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// link is one connection to the server, over either transport.
type link interface {
	// read hands every server message to handle until the link ends or
	// handle returns false, and returns the close code the server sent (0:
	// none).
	read(handle func([]byte) bool) (code int, reason string)
	// write sends one protocol frame; the caller serialises writes.
	write(b []byte) error
	// close ends the link politely; cut ends it at once.
	close()
	cut()
}

// wsLink is a WebSocket connection.
type wsLink struct {
	c    *Client
	conn net.Conn
}

func (l *wsLink) read(handle func([]byte) bool) (int, string) {
	rd := &wsutil.Reader{Source: l.conn, State: ws.StateClientSide, CheckUTF8: true}
	ctl := wsutil.ControlFrameHandler(lockedWriter{l.c, l.conn}, ws.StateClientSide)
	for {
		hdr, err := rd.NextFrame()
		if err != nil {
			return 0, ""
		}
		if hdr.OpCode.IsControl() {
			if err := ctl(hdr, rd); err != nil {
				var ce wsutil.ClosedError
				if errors.As(err, &ce) {
					return int(ce.Code), ce.Reason
				}
				return 0, ""
			}
			continue
		}
		data, err := io.ReadAll(rd)
		if err != nil {
			return 0, ""
		}
		if !handle(data) {
			return 0, ""
		}
	}
}

func (l *wsLink) write(b []byte) error { return wsutil.WriteClientText(l.conn, b) }

func (l *wsLink) close() {
	_ = l.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_ = wsutil.WriteClientMessage(l.conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))
	l.conn.Close()
}

func (l *wsLink) cut() { l.conn.Close() }

type lockedWriter struct {
	c    *Client
	conn net.Conn
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.c.wmu.Lock()
	defer w.c.wmu.Unlock()
	return w.conn.Write(p)
}

// sseLink is a Server-Sent Events stream (GET) with frames sent as POSTs
// naming the stream's session.
type sseLink struct {
	hc     *http.Client
	body   io.ReadCloser
	rd     *bufio.Reader
	cancel context.CancelFunc
	post   string
	header http.Header
	once   sync.Once
}

// dialSSE opens the stream and reads its session event.
func (c *Client) dialSSE(ctx context.Context, u *url.URL, h http.Header) (link, error) {
	tr := &http.Transport{MaxIdleConnsPerHost: 2, IdleConnTimeout: 30 * time.Second, TLSClientConfig: c.opts.TLSConfig}
	if c.opts.LocalAddr != "" {
		la, err := net.ResolveTCPAddr("tcp", c.opts.LocalAddr)
		if err != nil {
			return nil, fmt.Errorf("wsclient: local addr: %w", err)
		}
		tr.DialContext = (&net.Dialer{LocalAddr: la, Timeout: 10 * time.Second}).DialContext
	}
	hc := &http.Client{Transport: tr}
	sctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, u.String(), nil)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("wsclient: %w", err)
	}
	req.Header = h.Clone()
	req.Header.Set("Accept", "text/event-stream")
	stop := context.AfterFunc(ctx, cancel) // the dial's deadline bounds the handshake only
	resp, err := hc.Do(req)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("wsclient: dial %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("wsclient: dial %s: %s: %s", u, resp.Status, bytes.TrimSpace(b))
	}
	l := &sseLink{hc: hc, body: resp.Body, rd: bufio.NewReader(resp.Body), cancel: cancel, header: h}
	event, data, err := l.next()
	stop()
	if err != nil || event != "session" {
		l.cut()
		return nil, fmt.Errorf("wsclient: dial %s: no session event (%q, %v)", u, event, err)
	}
	var s struct {
		Session string `json:"session"`
	}
	if err := json.Unmarshal(data, &s); err != nil || s.Session == "" {
		l.cut()
		return nil, fmt.Errorf("wsclient: dial %s: bad session event %s", u, data)
	}
	pu := *u
	pu.RawQuery = url.Values{"session": {s.Session}}.Encode()
	l.post = pu.String()
	return l, nil
}

// next reads one event: its name and its data lines joined by "\n".
func (l *sseLink) next() (event string, data []byte, err error) {
	var buf bytes.Buffer
	lines := 0
	for {
		line, err := l.rd.ReadString('\n')
		if err != nil {
			return "", nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "":
			if lines > 0 || event != "" {
				return event, buf.Bytes(), nil
			}
		case strings.HasPrefix(line, ":"): // a comment (heartbeat)
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
		case strings.HasPrefix(line, "data:"):
			if lines > 0 {
				buf.WriteByte('\n')
			}
			buf.WriteString(strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
			lines++
		}
	}
}

func (l *sseLink) read(handle func([]byte) bool) (int, string) {
	for {
		event, data, err := l.next()
		if err != nil {
			return 0, ""
		}
		if event == "close" {
			var c struct {
				Code   int    `json:"code"`
				Reason string `json:"reason"`
			}
			_ = json.Unmarshal(data, &c)
			return c.Code, c.Reason
		}
		if len(data) > 0 && !handle(data) {
			return 0, ""
		}
	}
}

func (l *sseLink) write(b []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, l.post, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header = l.header.Clone()
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.hc.Do(req)
	if err != nil {
		return fmt.Errorf("wsclient: send: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("wsclient: send: %s", resp.Status)
	}
	return nil
}

func (l *sseLink) close() { l.cut() }

func (l *sseLink) cut() {
	l.once.Do(func() {
		l.cancel()
		l.body.Close()
		l.hc.CloseIdleConnections()
	})
}
