package api

import (
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// maxDepth bounds the nesting of arrays and objects in a request body.
const maxDepth = 1000

// decoder reads one request body: a JSON object whose known fields are
// decoded and whose other values are validated and skipped. It validates as
// strictly as encoding/json (and also refuses invalid UTF-8, which a
// WebSocket text frame may not carry), without reflection and without
// allocating except for the strings it returns. Field names match exactly.
type decoder struct {
	b []byte
	i int
}

// syntaxError is a malformed body.
type syntaxError struct {
	msg string
	off int
}

func (e *syntaxError) Error() string { return e.msg + " at byte " + strconv.Itoa(e.off) }

func (d *decoder) fail(msg string) error { return &syntaxError{msg, d.i} }

func (d *decoder) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// end reports whether only spaces are left.
func (d *decoder) end() bool {
	d.ws()
	return d.i >= len(d.b)
}

// peek returns the next non-space byte, or 0 at the end.
func (d *decoder) peek() byte {
	d.ws()
	if d.i < len(d.b) {
		return d.b[d.i]
	}
	return 0
}

// body decodes the whole input as one object (an empty or blank input is
// the empty object), calling field for each member; field must consume the
// value. Trailing data is an error.
func (d *decoder) body(field func(key []byte) error) error {
	if d.end() {
		return nil
	}
	if err := d.object(field); err != nil {
		return err
	}
	if !d.end() {
		return d.fail("data after the JSON object")
	}
	return nil
}

// object reads {"key": value, ...}, calling field for each member.
func (d *decoder) object(field func(key []byte) error) error {
	if d.peek() != '{' {
		return d.fail("want a JSON object")
	}
	d.i++
	if d.peek() == '}' {
		d.i++
		return nil
	}
	for {
		if d.peek() != '"' {
			return d.fail("want a field name")
		}
		raw, esc, err := d.str()
		if err != nil {
			return err
		}
		key := raw
		if esc {
			key = unescape(nil, raw)
		}
		if d.peek() != ':' {
			return d.fail("want ':'")
		}
		d.i++
		d.ws()
		if err := field(key); err != nil {
			return err
		}
		switch d.peek() {
		case ',':
			d.i++
		case '}':
			d.i++
			return nil
		default:
			return d.fail("want ',' or '}'")
		}
	}
}

// array reads [value, ...], calling elem for each element; elem must
// consume the value. A null is the empty array.
func (d *decoder) array(elem func() error) error {
	switch d.peek() {
	case 'n':
		return d.null()
	case '[':
	default:
		return d.fail("want an array")
	}
	d.i++
	if d.peek() == ']' {
		d.i++
		return nil
	}
	for {
		d.ws()
		if err := elem(); err != nil {
			return err
		}
		switch d.peek() {
		case ',':
			d.i++
		case ']':
			d.i++
			return nil
		default:
			return d.fail("want ',' or ']'")
		}
	}
}

// str reads a string at d.i (which holds '"') and returns its raw
// contents, and whether they hold escapes.
func (d *decoder) str() (raw []byte, escaped bool, err error) {
	start := d.i + 1
	ascii := true
	for i := start; i < len(d.b); i++ {
		c := d.b[i]
		switch {
		case c == '"':
			raw = d.b[start:i]
			if !ascii && !utf8.Valid(raw) {
				d.i = start
				return nil, false, d.fail("invalid UTF-8 in a string")
			}
			d.i = i + 1
			return raw, escaped, nil
		case c == '\\':
			escaped = true
			i++
			if i >= len(d.b) {
				break
			}
			switch d.b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(d.b) || !isHex(d.b[i+1]) || !isHex(d.b[i+2]) || !isHex(d.b[i+3]) || !isHex(d.b[i+4]) {
					d.i = i
					return nil, false, d.fail(`invalid \u escape`)
				}
				i += 4
			default:
				d.i = i
				return nil, false, d.fail("invalid escape")
			}
		case c < 0x20:
			d.i = i
			return nil, false, d.fail("control character in a string")
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	d.i = len(d.b)
	return nil, false, d.fail("unterminated string")
}

// stringValue reads a string (null: "") and returns it decoded.
func (d *decoder) stringValue(what string) (string, error) {
	switch d.peek() {
	case '"':
	case 'n':
		return "", d.null()
	default:
		return "", d.fail(what + " must be a string")
	}
	raw, esc, err := d.str()
	if err != nil {
		return "", err
	}
	if esc {
		return string(unescape(nil, raw)), nil
	}
	return string(raw), nil
}

// uintValue reads a non-negative integer (null: 0).
func (d *decoder) uintValue(what string) (uint64, error) {
	if d.peek() == 'n' {
		return 0, d.null()
	}
	start := d.i
	if err := d.number(); err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(string(d.b[start:d.i]), 10, 64)
	if err != nil {
		d.i = start
		return 0, d.fail(what + " must be a non-negative integer")
	}
	return v, nil
}

// boolValue reads true, false or null (false).
func (d *decoder) boolValue(what string) (bool, error) {
	switch d.peek() {
	case 't':
		return true, d.literal("true")
	case 'f':
		return false, d.literal("false")
	case 'n':
		return false, d.null()
	}
	return false, d.fail(what + " must be a boolean")
}

// raw reads any value and returns it as it is in the body.
func (d *decoder) raw() ([]byte, error) {
	d.ws()
	start := d.i
	if err := d.skip(0); err != nil {
		return nil, err
	}
	return d.b[start:d.i], nil
}

// skip reads and validates one value.
func (d *decoder) skip(depth int) error {
	if depth > maxDepth {
		return d.fail("nested too deeply")
	}
	if d.end() {
		return d.fail("unexpected end of JSON")
	}
	switch c := d.b[d.i]; {
	case c == '{':
		return d.object(func([]byte) error { return d.skip(depth + 1) })
	case c == '[':
		return d.array(func() error { return d.skip(depth + 1) })
	case c == '"':
		_, _, err := d.str()
		return err
	case c == 't':
		return d.literal("true")
	case c == 'f':
		return d.literal("false")
	case c == 'n':
		return d.null()
	case c == '-' || c >= '0' && c <= '9':
		return d.number()
	}
	return d.fail("invalid character " + strconv.QuoteRune(rune(d.b[d.i])))
}

func (d *decoder) null() error { return d.literal("null") }

func (d *decoder) literal(lit string) error {
	if len(d.b)-d.i < len(lit) || string(d.b[d.i:d.i+len(lit)]) != lit {
		return d.fail("invalid literal")
	}
	d.i += len(lit)
	return nil
}

// number reads a JSON number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (d *decoder) number() error {
	b, i := d.b, d.i
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	default:
		d.i = i
		return d.fail("invalid number")
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || !isDigit(b[i]) {
			d.i = i
			return d.fail("invalid number")
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			d.i = i
			return d.fail("invalid number")
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	d.i = i
	return nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isHex(c byte) bool { return isDigit(c) || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

// unescape appends the decoded contents of a validated string to dst, as
// encoding/json decodes them (lone surrogates become U+FFFD).
func unescape(dst, raw []byte) []byte {
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c != '\\' {
			dst = append(dst, c)
			continue
		}
		i++
		switch raw[i] {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r := rune(hex4(raw[i+1:]))
			i += 4
			if utf16.IsSurrogate(r) {
				r2 := utf8.RuneError
				if i+6 < len(raw) && raw[i+1] == '\\' && raw[i+2] == 'u' {
					r2 = rune(hex4(raw[i+3:]))
				}
				if dec := utf16.DecodeRune(r, r2); dec != utf8.RuneError {
					r = dec
					i += 6
				} else {
					r = utf8.RuneError
				}
			}
			dst = utf8.AppendRune(dst, r)
		default: // '"', '\\', '/'
			dst = append(dst, raw[i])
		}
	}
	return dst
}

func hex4(b []byte) uint16 {
	var v uint16
	for _, c := range b[:4] {
		v <<= 4
		switch {
		case c >= '0' && c <= '9':
			v |= uint16(c - '0')
		case c >= 'a' && c <= 'f':
			v |= uint16(c - 'a' + 10)
		default:
			v |= uint16(c - 'A' + 10)
		}
	}
	return v
}
