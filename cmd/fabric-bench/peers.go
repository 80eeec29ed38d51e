package main

// The peers: how fabric-bench starts them (--spawn) and publishes to them.
// bench/peers.sh installs them and writes the same configuration for
// running them by hand.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"
	"github.com/nats-io/nats.go"
)

// defaultURL is where each target listens when neither --url nor --spawn
// says (bench/peers.sh's ports for the peers).
func defaultURL(target string) string {
	switch target {
	case targetCentrifugo:
		return "ws://127.0.0.1:18000/connection/websocket"
	case targetNATS:
		return "ws://127.0.0.1:18222"
	}
	return "ws://127.0.0.1:8080/ws"
}

// centrifugoConfig is Centrifugo v6's configuration for the benchmarks, as
// its documentation recommends for one node: insecure client mode (no
// JWT; clients connect, subscribe and publish freely, as the load tool's
// clients do on Fabric with --client-publish bench:*), the memory engine,
// the HTTP API behind a key, the "bench" namespace (the topics'
// "bench:" prefix) without history, recovery or presence, like Fabric's
// plain topics. pool sets websocket.use_write_buffer_pool, its option to
// save memory on connections that write little.
func centrifugoConfig(addr, apiKey string, pool bool) ([]byte, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	cfg := map[string]any{
		"log":         map[string]any{"level": "error"},
		"http_server": map[string]any{"address": host, "port": json.Number(port)},
		"client": map[string]any{
			"insecure":        true,
			"allowed_origins": []string{"*"},
		},
		"engine":   map[string]any{"type": "memory"},
		"http_api": map[string]any{"key": apiKey},
		"channel": map[string]any{
			"namespaces": []any{map[string]any{
				"name":                       "bench",
				"allow_subscribe_for_client": true,
				"allow_publish_for_client":   true,
			}},
		},
		"websocket": map[string]any{"use_write_buffer_pool": pool},
		"health":    map[string]any{"enabled": true},
	}
	return json.MarshalIndent(cfg, "", "  ")
}

// spawnPeer starts the peer binary o.Spawn on free loopback ports and
// returns it with the subscribe URL and the publish base (an HTTP base
// URL for Centrifugo, a NATS URL for nats-ws). Its files are removed with
// dir once it has stopped.
func spawnPeer(o options) (cmd *exec.Cmd, dir, sub, pub string, err error) {
	addr := freeAddr()
	switch o.Target {
	case targetCentrifugo:
		dir, err := os.MkdirTemp("", "fabric-bench-centrifugo")
		if err != nil {
			return nil, "", "", "", err
		}
		cfg, err := centrifugoConfig(addr, o.APIKey, o.CentPool)
		if err != nil {
			return nil, dir, "", "", err
		}
		file := filepath.Join(dir, "config.json")
		if err := os.WriteFile(file, cfg, 0o600); err != nil {
			return nil, dir, "", "", err
		}
		cmd = exec.Command(o.Spawn, "--config", file)
		cmd.Dir = dir
		cmd.Stderr = os.Stderr
		cmd.Stdout = os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, dir, "", "", err
		}
		base := "http://" + addr
		if err := waitHTTP(base+"/health", 60*time.Second); err != nil {
			return cmd, dir, "", "", err
		}
		return cmd, dir, "ws://" + addr + "/connection/websocket", base, nil
	case targetNATS:
		client := freeAddr()
		cmd = exec.Command(o.Spawn, "--ws", addr, "--client", client)
		cmd.Stderr = io.Discard // its notices; errors show as failed connections
		if err := cmd.Start(); err != nil {
			return nil, "", "", "", err
		}
		if err := waitTCP(client, 60*time.Second); err != nil {
			return cmd, "", "", "", err
		}
		return cmd, "", "ws://" + addr, "nats://" + client, nil
	}
	return nil, "", "", "", fmt.Errorf("no peer %q", o.Target)
}

func waitHTTP(u string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s", u, d)
}

func waitTCP(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not listening after %s", addr, d)
}

// stopProcess ends a spawned server: SIGINT, then SIGKILL if it is still
// there after 15 s.
func stopProcess(c *exec.Cmd) {
	_ = c.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = c.Process.Kill()
		<-done
	}
}

// centrifugoHTTPSender publishes with Centrifugo's HTTP API, the way
// --via http publishes to Fabric's: one request per message, keep-alive
// connections.
func centrifugoHTTPSender(base, apiKey string) func(ctx context.Context, topic string, data []byte) error {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 10 * time.Second}
	var body bytes.Buffer
	return func(ctx context.Context, topic string, data []byte) error {
		body.Reset()
		body.WriteString(`{"channel":"`)
		body.WriteString(topic)
		body.WriteString(`","data":`)
		body.Write(data)
		body.WriteByte('}')
		req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, base+"/api/publish", bytes.NewReader(body.Bytes()))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-API-Key", apiKey)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("publish: %s", resp.Status)
		}
		if bytes.Contains(b, []byte(`"error"`)) {
			return fmt.Errorf("publish: %s", b)
		}
		return nil
	}
}

// wsPublisher is one publishing WebSocket: commands go out as masked text
// frames; a goroutine reads (and drops) the answers and answers pings.
type wsPublisher struct {
	nc net.Conn
	mu sync.Mutex
}

func dialPublisher(rawURL string) (*wsPublisher, *bufio.Reader, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, nil, err
	}
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Origin": {"http://" + u.Host}}), Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, br, _, err := d.Dial(ctx, rawURL)
	if err != nil {
		return nil, nil, err
	}
	if br == nil {
		br = bufio.NewReaderSize(nc, 4096)
	}
	return &wsPublisher{nc: nc}, br, nil
}

func (p *wsPublisher) write(frame []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return ws.WriteFrame(p.nc, ws.MaskFrame(ws.NewTextFrame(frame)))
}

// centrifugoWSSender publishes with Centrifugo's publish command over one
// WebSocket per publisher (the client-side publish, like Fabric's
// fabric/publish over --via rpc), without waiting for the replies; replies
// carrying an error are counted through fail.
func centrifugoWSSender(base string, fail func(uint64) uint64) func(ctx context.Context, topic string, data []byte) error {
	p, br, err := dialPublisher("ws" + strings.TrimPrefix(base, "http") + "/connection/websocket")
	if err == nil {
		err = setupCentrifugo(p.nc, br, nil)
	}
	if err != nil {
		return func(context.Context, string, []byte) error { return err }
	}
	go func() {
		for {
			_, b, err := readFrame(br)
			if err != nil {
				return
			}
			for line := range bytes.SplitSeq(b, []byte("\n")) {
				switch {
				case bytes.Equal(line, []byte("{}")):
					_ = p.write([]byte("{}"))
				case bytes.Contains(line, []byte(`"error"`)):
					fail(1)
				}
			}
		}
	}()
	var frame []byte
	id := 1
	return func(ctx context.Context, topic string, data []byte) error {
		id++
		frame = fmt.Appendf(frame[:0], `{"id":%d,"publish":{"channel":%q,"data":`, id, topic)
		frame = append(frame, data...)
		frame = append(frame, "}}"...)
		return p.write(frame)
	}
}

// natsSender publishes with a NATS client connection (NATS has no HTTP
// API); the connection flushes as nats.go does by default.
func natsSender(natsURL string) func(ctx context.Context, topic string, data []byte) error {
	nc, err := nats.Connect(natsURL, nats.Name("fabric-bench publisher"))
	if err != nil {
		return func(context.Context, string, []byte) error { return err }
	}
	return func(_ context.Context, topic string, data []byte) error {
		return nc.Publish(topic, data)
	}
}

// natsWSSender publishes with PUB over NATS's WebSocket listener, one
// connection per publisher.
func natsWSSender(wsURL string) func(ctx context.Context, topic string, data []byte) error {
	p, br, err := dialPublisher(wsURL)
	if err == nil {
		var st wireState
		err = setupNATS(p.nc, br, nil, &st)
	}
	if err != nil {
		return func(context.Context, string, []byte) error { return err }
	}
	go func() {
		var stream []byte
		for {
			_, b, err := readFrame(br)
			if err != nil {
				return
			}
			stream = append(stream, b...)
			for {
				i := bytes.Index(stream, []byte("\r\n"))
				if i < 0 {
					break
				}
				if bytes.Equal(stream[:i], []byte("PING")) {
					_ = p.write([]byte("PONG\r\n"))
				}
				stream = stream[i+2:]
			}
		}
	}()
	var frame []byte
	return func(_ context.Context, topic string, data []byte) error {
		frame = fmt.Appendf(frame[:0], "PUB %s %d\r\n", topic, len(data))
		frame = append(frame, data...)
		frame = append(frame, "\r\n"...)
		return p.write(frame)
	}
}

// loadAverage is /proc/loadavg's three averages.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
