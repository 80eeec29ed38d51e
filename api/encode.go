package api

import (
	"strconv"
	"unicode/utf8"
)

// appendString appends s as a JSON string: quotes, backslashes and control
// characters escaped, invalid UTF-8 replaced by U+FFFD.
func appendString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\t':
				dst = append(dst, '\\', 't')
			case '\r':
				dst = append(dst, '\\', 'r')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// appendField appends ,"name":.
func appendField(dst []byte, name string) []byte {
	dst = append(dst, ',', '"')
	dst = append(dst, name...)
	return append(dst, '"', ':')
}

func appendBool(dst []byte, v bool) []byte {
	if v {
		return append(dst, "true"...)
	}
	return append(dst, "false"...)
}

// appendResult appends one result of a batch or broadcast: what a publish
// answers, or its error.
func appendResult(dst []byte, m *message) []byte {
	if m.err != nil {
		dst = appendError(append(dst, '{'), m.err)
		return append(dst, '}')
	}
	dst = append(dst, `{"ok":true`...)
	dst = appendSeq(dst, m.seq)
	return append(dst, '}')
}

// appendSeq appends ,"seq":N when N is not 0.
func appendSeq(dst []byte, seq uint64) []byte {
	if seq == 0 {
		return dst
	}
	dst = append(dst, `,"seq":`...)
	return strconv.AppendUint(dst, seq, 10)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// quote returns s, shortened, as a quoted string for error messages.
func quote(s string) string {
	if len(s) > 64 {
		s = s[:64] + "…"
	}
	return strconv.Quote(s)
}
