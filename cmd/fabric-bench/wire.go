package main

// The systems fabric-bench drives (--target), as a client sees them after
// the WebSocket upgrade:
//
//   - fabric: {"type":"subscribe","topic":T,"ref":N} per topic, each
//     answered by "subscribed"; every message is one text frame, its
//     envelope carrying the payload.
//   - centrifugo: Centrifugo's JSON protocol (v2): {"id":1,"connect":{}}
//     then {"id":N,"subscribe":{"channel":T}}, newline-separated in one
//     frame, each answered by a reply with the same id. Publications are
//     pushes, {"push":{"channel":T,"pub":{"data":...}}}, several per frame
//     separated by newlines; the server's ping is an empty command, {},
//     which the client answers with {}.
//   - nats-ws: the NATS text protocol over NATS's own WebSocket listener:
//     INFO from the server, then CONNECT, SUB T sid and PING, answered by
//     PONG once the subscriptions are registered. Messages are
//     "MSG <subject> <sid> <size>\r\n<payload>\r\n" in a byte stream that
//     the server cuts into frames as it flushes, so a message may span
//     frames; the server's PING is answered with PONG.
//
// Topic names are the same on every system ("bench:b", "bench:t:<i>",
// "bench:s:<i>"): Centrifugo reads "bench:" as a namespace, which its
// configuration declares; a ':' is an ordinary character in a NATS subject.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/gobwas/ws"
)

// Targets.
const (
	targetFabric     = "fabric"
	targetCentrifugo = "centrifugo"
	targetNATS       = "nats-ws"
)

// wireState is what one connection's protocol keeps between frames.
type wireState struct {
	stream []byte // nats-ws: protocol bytes of an incomplete line or message
}

// readFrame reads one whole frame (server frames are not masked).
func readFrame(br *bufio.Reader) (ws.OpCode, []byte, error) {
	h, err := ws.ReadHeader(br)
	if err != nil {
		return 0, nil, err
	}
	if h.Length > 1<<20 {
		return 0, nil, fmt.Errorf("frame of %d bytes", h.Length)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(br, p); err != nil {
		return 0, nil, err
	}
	return h.OpCode, p, nil
}

// writeText writes p as one masked text frame.
func writeText(nc net.Conn, p []byte) error {
	return ws.WriteFrame(nc, ws.MaskFrame(ws.NewTextFrame(p)))
}

// maskedText returns p as one masked text frame's bytes.
func maskedText(p []byte) []byte {
	var b bytes.Buffer
	_ = ws.WriteFrame(&b, ws.MaskFrame(ws.NewTextFrame(p)))
	return b.Bytes()
}

var (
	centrifugoPong = maskedText([]byte("{}"))
	natsPong       = maskedText([]byte("PONG\r\n"))
)

// setupConn runs target's protocol on a just upgraded connection: connect
// and subscribe to topics, returning once every subscription is
// acknowledged (within 30 s). Bytes read past the acknowledgements stay in
// br; st carries protocol state.
func setupConn(target string, nc net.Conn, br *bufio.Reader, topics []string, st *wireState) error {
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer nc.SetReadDeadline(time.Time{})
	switch target {
	case targetCentrifugo:
		return setupCentrifugo(nc, br, topics)
	case targetNATS:
		return setupNATS(nc, br, topics, st)
	default:
		return setupFabric(nc, br, topics)
	}
}

func setupFabric(nc net.Conn, br *bufio.Reader, topics []string) error {
	for k, t := range topics {
		if err := writeText(nc, fmt.Appendf(nil, `{"type":"subscribe","topic":%q,"ref":%d}`, t, k)); err != nil {
			return err
		}
	}
	for acked := 0; acked < len(topics); {
		_, p, err := readFrame(br)
		if err != nil {
			return err
		}
		if bytes.Contains(p, []byte(`"subscribe-denied"`)) {
			return fmt.Errorf("subscribe denied: %s", p)
		}
		if bytes.Contains(p, []byte(`"subscribed"`)) {
			acked++
		}
	}
	return nil
}

func setupCentrifugo(nc net.Conn, br *bufio.Reader, topics []string) error {
	cmds := []byte(`{"id":1,"connect":{"name":"fabric-bench"}}`)
	for k, t := range topics {
		cmds = fmt.Appendf(cmds, "\n{\"id\":%d,\"subscribe\":{\"channel\":%q}}", k+2, t)
	}
	if err := writeText(nc, cmds); err != nil {
		return err
	}
	for acked := 0; acked < len(topics)+1; {
		_, p, err := readFrame(br)
		if err != nil {
			return err
		}
		for line := range bytes.SplitSeq(p, []byte("\n")) {
			switch {
			case len(line) == 0:
			case bytes.Equal(line, []byte("{}")): // a ping already
				if _, err := nc.Write(centrifugoPong); err != nil {
					return err
				}
			case bytes.Contains(line, []byte(`"error"`)):
				return fmt.Errorf("centrifugo refused: %s", line)
			case bytes.HasPrefix(line, []byte(`{"id":`)):
				acked++
			}
		}
	}
	return nil
}

func setupNATS(nc net.Conn, br *bufio.Reader, topics []string, st *wireState) error {
	cmds := []byte(`CONNECT {"verbose":false,"pedantic":false,"protocol":1,"headers":false,"no_responders":false,"name":"fabric-bench"}` + "\r\n")
	for k, t := range topics {
		cmds = fmt.Appendf(cmds, "SUB %s %d\r\n", t, k+1)
	}
	cmds = append(cmds, "PING\r\n"...)
	if err := writeText(nc, cmds); err != nil {
		return err
	}
	for {
		_, p, err := readFrame(br)
		if err != nil {
			return err
		}
		st.stream = append(st.stream, p...)
		for {
			i := bytes.Index(st.stream, []byte("\r\n"))
			if i < 0 {
				break
			}
			line := st.stream[:i]
			st.stream = st.stream[i+2:]
			switch {
			case bytes.HasPrefix(line, []byte("-ERR")):
				return fmt.Errorf("nats refused: %s", line)
			case bytes.Equal(line, []byte("PING")):
				if _, err := nc.Write(natsPong); err != nil {
					return err
				}
			case bytes.Equal(line, []byte("PONG")):
				st.stream = append([]byte(nil), st.stream...)
				return nil
			}
		}
	}
}

// onData handles one complete data frame's payload: it records each
// delivery it holds (the "ts" of every benchmark payload) and returns the
// bytes to write back (pongs), appended to out.
func (w *worker) onData(st *wireState, id int, payload []byte, now int64, out []byte) []byte {
	switch w.cfg.Target {
	case targetCentrifugo:
		for len(payload) > 0 {
			line := payload
			if i := bytes.IndexByte(payload, '\n'); i >= 0 {
				line, payload = payload[:i], payload[i+1:]
			} else {
				payload = nil
			}
			if len(line) == 2 && line[0] == '{' && line[1] == '}' {
				out = append(out, centrifugoPong...)
				continue
			}
			w.recordTS(id, line, now)
		}
		return out
	case targetNATS:
		st.stream = append(st.stream, payload...)
		used, out := w.natsMessages(st.stream, id, now, out)
		if used == len(st.stream) {
			st.stream = st.stream[:0]
		} else if used > 0 {
			st.stream = append(st.stream[:0], st.stream[used:]...)
		}
		return out
	default:
		w.recordTS(id, payload, now)
		return out
	}
}

// natsMessages handles the complete protocol lines and messages at the
// start of b and returns how many bytes they took.
func (w *worker) natsMessages(b []byte, id int, now int64, out []byte) (int, []byte) {
	used := 0
	for {
		rest := b[used:]
		i := bytes.Index(rest, []byte("\r\n"))
		if i < 0 {
			return used, out
		}
		line := rest[:i]
		if !bytes.HasPrefix(line, []byte("MSG ")) {
			if bytes.Equal(line, []byte("PING")) {
				out = append(out, natsPong...)
			}
			used += i + 2
			continue
		}
		// MSG <subject> <sid> [reply] <size>: the size is the last field.
		sp := bytes.LastIndexByte(line, ' ')
		size, err := strconv.Atoi(string(line[sp+1:]))
		if err != nil || size < 0 {
			used += i + 2 // unparseable: skip the line
			continue
		}
		end := i + 2 + size + 2
		if len(rest) < end {
			return used, out
		}
		w.recordTS(id, rest[i+2:i+2+size], now)
		used += end
	}
}

var tsKey = []byte(`"ts":`)

// recordTS records a delivery for every benchmark timestamp in p.
func (w *worker) recordTS(id int, p []byte, now int64) {
	for {
		i := bytes.Index(p, tsKey)
		if i < 0 {
			return
		}
		p = p[i+len(tsKey):]
		var ts int64
		n := 0
		for _, b := range p {
			if b < '0' || b > '9' {
				break
			}
			ts = ts*10 + int64(b-'0')
			n++
		}
		p = p[n:]
		if ts > 0 {
			w.hist.record(id, time.Duration(now-ts))
			w.received.Add(1)
		}
	}
}

// churnGreeting is what target's client sends and waits for after the
// upgrade for its connection to be usable (nothing for Fabric, whose
// session exists once the upgrade is answered).
func churnGreeting(target string, nc net.Conn, br *bufio.Reader) error {
	switch target {
	case targetCentrifugo:
		if err := writeText(nc, []byte(`{"id":1,"connect":{}}`)); err != nil {
			return err
		}
		for {
			_, p, err := readFrame(br)
			if err != nil {
				return err
			}
			if bytes.Contains(p, []byte(`"error"`)) {
				return fmt.Errorf("centrifugo refused: %s", p)
			}
			if bytes.Contains(p, []byte(`{"id":1,`)) {
				return nil
			}
		}
	case targetNATS:
		var st wireState
		return setupNATS(nc, br, nil, &st)
	}
	return nil
}

// errNoUpgrade reports a handshake answered with something else than 101.
var errNoUpgrade = errors.New("upgrade refused")
