package fabric

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// ErrInvalidData is wrapped when a publish payload is not valid JSON.
var ErrInvalidData = errors.New("invalid data")

// EncodeData returns data as JSON: json.RawMessage and []byte holding JSON
// are checked and used as they are, nil becomes null, anything else goes
// through encoding/json.
func EncodeData(data any) ([]byte, error) {
	switch d := data.(type) {
	case nil:
		return []byte("null"), nil
	case json.RawMessage:
		if !json.Valid(d) {
			return nil, fmt.Errorf("%w: not valid JSON", ErrInvalidData)
		}
		return d, nil
	}
	b, err := json.Marshal(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidData, err)
	}
	return b, nil
}

// AppendEnvelope appends the wire envelope {"topic":T,"event":E,"data":D} to
// dst. topic and event must have passed validation (they are written without
// escaping); data must be JSON.
func AppendEnvelope(dst []byte, topic, event string, data []byte) []byte {
	dst = append(dst, `{"topic":"`...)
	dst = append(dst, topic...)
	dst = append(dst, `","event":"`...)
	dst = append(dst, event...)
	dst = append(dst, `","data":`...)
	dst = append(dst, data...)
	return append(dst, '}')
}

// Envelope returns a new envelope for a validated topic and event.
func Envelope(topic, event string, data []byte) []byte {
	return AppendEnvelope(make([]byte, 0, len(topic)+len(event)+len(data)+32), topic, event, data)
}

// WithSeq returns a copy of envelope with ,"seq":N added as its last field.
func WithSeq(envelope []byte, seq uint64) []byte {
	if len(envelope) == 0 || envelope[len(envelope)-1] != '}' {
		return envelope
	}
	out := make([]byte, 0, len(envelope)+28)
	out = append(out, envelope[:len(envelope)-1]...)
	out = append(out, `,"seq":`...)
	out = strconv.AppendUint(out, seq, 10)
	return append(out, '}')
}

// SplitEnvelope returns the topic, event and data of an envelope produced by
// AppendEnvelope, without decoding JSON. ok is false for anything else.
func SplitEnvelope(envelope []byte) (topic, event, data []byte, ok bool) {
	const t, e, d = `{"topic":"`, `","event":"`, `","data":`
	if !bytes.HasPrefix(envelope, []byte(t)) || len(envelope) < len(t)+len(e)+len(d)+2 {
		return nil, nil, nil, false
	}
	rest := envelope[len(t):]
	i := bytes.IndexByte(rest, '"') // topics hold no quotes
	if i < 0 || !bytes.HasPrefix(rest[i:], []byte(e)) {
		return nil, nil, nil, false
	}
	topic, rest = rest[:i], rest[i+len(e):]
	i = bytes.IndexByte(rest, '"')
	if i < 0 || !bytes.HasPrefix(rest[i:], []byte(d)) {
		return nil, nil, nil, false
	}
	event, rest = rest[:i], rest[i+len(d):]
	if len(rest) < 2 || rest[len(rest)-1] != '}' {
		return nil, nil, nil, false
	}
	return topic, event, rest[:len(rest)-1], true
}

// appendJSONString appends s as a JSON string: quotes, backslashes and
// control characters escaped, invalid UTF-8 replaced as encoding/json does.
func appendJSONString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				dst = append(dst, '\\', c)
			case c < 0x20:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				dst = append(dst, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, `\ufffd`...)
		} else {
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return append(dst, '"')
}
