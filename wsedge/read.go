package wsedge

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/fabricrt/fabric/fabric"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsflate"
)

// readBufSize is the pooled buffer one readiness event reads into.
const readBufSize = 32 * 1024

var readBufs = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}

// startReading begins delivering the socket's bytes to feed.
func (c *conn) startReading() {
	if c.edge.poller != nil && c.rc != nil {
		c.readFn = c.rawRead
		if err := c.edge.poller.add(c); err == nil {
			return
		}
	}
	go c.readLoop()
}

// readLoop is the goroutine-per-connection read path.
func (c *conn) readLoop() {
	buf := make([]byte, 4096)
	for {
		n, err := c.nc.Read(buf)
		if n > 0 {
			c.touch()
			c.feed(buf[:n])
		}
		if err != nil {
			c.terminate(1006, "connection lost")
			return
		}
		if c.isClosed() {
			return
		}
	}
}

// onReadable drains a socket that epoll reported readable, then re-arms it.
func (c *conn) onReadable() {
	// One-shot epoll already keeps readers from overlapping; the lock makes
	// the hand-off between successive read goroutines visible to the memory
	// model (and the race detector). It is never contended.
	c.rmu.Lock()
	defer c.rmu.Unlock()
	bp := readBufs.Get().(*[]byte)
	c.rbuf = *bp
	lost := false
	for {
		c.rn, c.rerr = 0, nil
		if err := c.rc.Read(c.readFn); err != nil {
			lost = true
			break
		}
		if c.rn > 0 {
			c.touch()
			c.feed(c.rbuf[:c.rn])
			if c.isClosed() || c.rn < len(c.rbuf) {
				break
			}
			continue
		}
		if errors.Is(c.rerr, errAgain) {
			break
		}
		lost = true // EOF or a socket error
		break
	}
	c.rbuf = nil
	readBufs.Put(bp)
	if lost {
		c.terminate(1006, "connection lost")
		return
	}
	if !c.isClosed() {
		c.edge.poller.rearm(c)
	}
}

func (c *conn) touch() {
	c.lastRead.Store(time.Now().UnixNano())
	c.pinged.Store(false)
}

func (c *conn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// feed parses as many whole frames as data completes and keeps the rest.
func (c *conn) feed(data []byte) {
	if len(c.in) > 0 {
		c.in = append(c.in, data...)
		data = c.in
	}
	n := c.parse(data)
	rest := data[n:]
	switch {
	case len(rest) == 0:
		c.in = nil // an idle connection keeps no buffer
	case len(c.in) > 0:
		c.in = c.in[:copy(c.in, rest)]
	default:
		c.in = append(make([]byte, 0, max(len(rest), 512)), rest...)
	}
}

// parse handles the complete frames at the start of b and returns the
// number of bytes consumed.
func (c *conn) parse(b []byte) int {
	maxLen := uint64(c.edge.opts.MaxPayloadLength)
	off := 0
	for {
		if c.isClosing() {
			return len(b) // nothing after a close matters
		}
		p := b[off:]
		if len(p) < 2 {
			return off
		}
		fin := p[0]&0x80 != 0
		rsv := (p[0] >> 4) & 0x7
		op := ws.OpCode(p[0] & 0x0f)
		if p[1]&0x80 == 0 {
			c.fail(ws.StatusProtocolError, "unmasked client frame")
			return len(b)
		}
		length := uint64(p[1] & 0x7f)
		hl := 6
		switch length {
		case 126:
			if len(p) < 8 {
				return off
			}
			length, hl = uint64(binary.BigEndian.Uint16(p[2:])), 8
		case 127:
			if len(p) < 14 {
				return off
			}
			length, hl = binary.BigEndian.Uint64(p[2:]), 14
		}
		switch {
		case op.IsReserved():
			c.fail(ws.StatusProtocolError, "reserved opcode")
			return len(b)
		case op.IsControl():
			if !fin || length > 125 || rsv != 0 {
				c.fail(ws.StatusProtocolError, "malformed control frame")
				return len(b)
			}
		default:
			compressed := rsv&0x4 != 0
			if rsv&^0x4 != 0 || (compressed && (!c.deflate || op == ws.OpContinuation)) {
				c.fail(ws.StatusProtocolError, "unexpected RSV bits")
				return len(b)
			}
			if (op == ws.OpContinuation) != (c.fragOp != 0) {
				c.fail(ws.StatusProtocolError, "bad fragmentation")
				return len(b)
			}
			if length > maxLen || uint64(len(c.frag))+length > maxLen {
				c.fail(ws.StatusMessageTooBig, "message too big")
				return len(b)
			}
		}
		if len(p) < hl || uint64(len(p)-hl) < length { // header (with mask key) or payload incomplete
			if need := hl + int(length); cap(c.in) < need && len(c.in) > 0 {
				grown := make([]byte, len(c.in), need)
				copy(grown, c.in)
				c.in = grown
			}
			return off
		}
		payload := p[hl : hl+int(length)]
		ws.Cipher(payload, [4]byte(p[hl-4:hl]), 0)
		off += hl + int(length)
		c.frame(fin, rsv&0x4 != 0, op, payload)
	}
}

// frame handles one complete frame (payload unmasked, valid only now).
func (c *conn) frame(fin, compressed bool, op ws.OpCode, payload []byte) {
	switch op {
	case ws.OpPing:
		c.enqueue(ws.MustCompileFrame(ws.NewPongFrame(bytes.Clone(payload))), true)
	case ws.OpPong:
	case ws.OpClose:
		code, reason, ok := parseClose(payload)
		if !ok {
			c.fail(ws.StatusProtocolError, "malformed close frame")
			return
		}
		c.peerClose(code, reason)
	case ws.OpContinuation:
		c.frag = append(c.frag, payload...)
		if fin {
			msg, op, z := c.frag, c.fragOp, c.fragZip
			c.frag, c.fragOp, c.fragZip = nil, 0, false
			c.message(op, z, msg)
		}
	default: // text or binary
		if !fin {
			c.frag = append(make([]byte, 0, len(payload)*2), payload...)
			c.fragOp, c.fragZip = op, compressed
			return
		}
		c.message(op, compressed, payload)
	}
}

// message handles one complete data message.
func (c *conn) message(op ws.OpCode, compressed bool, payload []byte) {
	if compressed {
		var err error
		if payload, err = inflate(payload, c.edge.opts.MaxPayloadLength); err != nil {
			if errors.Is(err, errTooBig) {
				c.fail(ws.StatusMessageTooBig, "message too big")
			} else {
				c.fail(ws.StatusProtocolError, "bad compressed data")
			}
			return
		}
	}
	if op == ws.OpText && !utf8.Valid(payload) {
		c.fail(ws.StatusInvalidFramePayloadData, "invalid UTF-8")
		return
	}
	c.edge.node.HandleFrame(c.client, payload, op == ws.OpBinary)
}

// fail counts a protocol violation and closes the connection with code.
func (c *conn) fail(code ws.StatusCode, reason string) {
	c.edge.metrics.InvalidFrames.WithLabelValues(reason).Inc()
	c.Close(int(code), reason)
}

// peerClose answers the peer's close frame and ends the connection.
func (c *conn) peerClose(code int, reason string) {
	echo := code
	if code == int(ws.StatusNoStatusRcvd) {
		echo = int(ws.StatusNormalClosure)
	}
	c.startClose(closeFrame(echo, ""), code, reason)
}

var errTooBig = errors.New("message too big")

var flateReaders = sync.Pool{New: func() any { return flate.NewReader(nil) }}

// inflate decompresses a permessage-deflate message, refusing more than max bytes.
func inflate(p []byte, maxLen int) ([]byte, error) {
	fr := flateReaders.Get().(io.ReadCloser)
	defer flateReaders.Put(fr)
	r := wsflate.NewReader(bytes.NewReader(p), func(src io.Reader) wsflate.Decompressor {
		_ = fr.(flate.Resetter).Reset(src, nil)
		return fr
	})
	out, err := io.ReadAll(io.LimitReader(r, int64(maxLen)+1))
	if err != nil {
		return nil, err
	}
	if len(out) > maxLen {
		return nil, errTooBig
	}
	return out, nil
}

var deflateWriters = sync.Pool{New: func() any { w, _ := flate.NewWriter(nil, flate.BestSpeed); return w }}

// compressFrame builds the permessage-deflate frame of an envelope.
func compressFrame(payload []byte) []byte {
	var buf bytes.Buffer
	fw := deflateWriters.Get().(*flate.Writer)
	defer deflateWriters.Put(fw)
	w := wsflate.NewWriter(&buf, func(dst io.Writer) wsflate.Compressor {
		fw.Reset(dst)
		return fw
	})
	if _, err := w.Write(payload); err != nil {
		return nil
	}
	if err := w.Close(); err != nil {
		return nil
	}
	z := buf.Bytes()
	hdr := fabric.FrameHeaderSize(len(z))
	out := make([]byte, hdr+len(z))
	fabric.PutFrameHeader(out, byte(ws.OpText), true, len(z))
	copy(out[hdr:], z)
	return out
}
