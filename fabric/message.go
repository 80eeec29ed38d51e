package fabric

import (
	"encoding/binary"
	"sync/atomic"
)

// Message is one envelope on its way to local subscribers. It is built once
// per instance and shared, read-only, by every connection it is delivered to.
type Message struct {
	// Topic is the topic the message was published on.
	Topic string
	// Seq is the message's sequence in the topic's history, 0 if the topic
	// is not persistent.
	Seq uint64
	// Frame is the complete, unmasked WebSocket text frame carrying the
	// envelope: header then payload. Payload aliases its tail.
	Frame []byte
	// Payload is the JSON envelope.
	Payload []byte

	alt atomic.Pointer[[]byte] // transport-specific variant, see Alt
	// repaired: read from the store to fill a gap in the live feed, possibly
	// long after a resume sent it to some clients (see holdSet.take).
	repaired bool
}

// NewMessage frames envelope for delivery. The envelope is copied once into
// the frame buffer.
func NewMessage(topic string, seq uint64, envelope []byte) *Message {
	n := len(envelope)
	hdr := FrameHeaderSize(n)
	frame := make([]byte, hdr+n)
	PutTextFrameHeader(frame, n)
	copy(frame[hdr:], envelope)
	return &Message{Topic: topic, Seq: seq, Frame: frame, Payload: frame[hdr:]}
}

// Alt returns the variant of the message that build produces (for example a
// compressed frame), building it at most once per message in the common case
// and sharing it between all connections that ask.
func (m *Message) Alt(build func(payload []byte) []byte) []byte {
	if p := m.alt.Load(); p != nil {
		return *p
	}
	b := build(m.Payload)
	m.alt.CompareAndSwap(nil, &b)
	return *m.alt.Load()
}

// FrameHeaderSize is the size of an unmasked WebSocket frame header for a
// payload of n bytes.
func FrameHeaderSize(n int) int {
	switch {
	case n < 126:
		return 2
	case n <= 0xffff:
		return 4
	default:
		return 10
	}
}

// PutTextFrameHeader writes a final, unmasked text-frame header for a payload
// of n bytes at the start of b, which must hold FrameHeaderSize(n) bytes.
func PutTextFrameHeader(b []byte, n int) { PutFrameHeader(b, 0x1, false, n) }

// PutFrameHeader writes a final, unmasked frame header with the given opcode
// (and RSV1 set when rsv1 is true, for compressed frames).
func PutFrameHeader(b []byte, opcode byte, rsv1 bool, n int) {
	b[0] = 0x80 | opcode
	if rsv1 {
		b[0] |= 0x40
	}
	switch {
	case n < 126:
		b[1] = byte(n)
	case n <= 0xffff:
		b[1] = 126
		binary.BigEndian.PutUint16(b[2:], uint16(n))
	default:
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:], uint64(n))
	}
}
