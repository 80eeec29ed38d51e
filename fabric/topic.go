package fabric

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxNameLength is the longest topic or event name accepted, in UTF-16 code
// units (the unit the JavaScript clients measure with).
const MaxNameLength = 256

// ReservedPrefix starts the names of system topics (__rpc, __replay:T,
// __presence:T); clients may subscribe to them but never publish to them.
const ReservedPrefix = "__"

// ErrInvalidTopic is wrapped by every topic validation failure.
var ErrInvalidTopic = errors.New("invalid topic")

// ErrInvalidEvent is wrapped by every event validation failure.
var ErrInvalidEvent = errors.New("invalid event")

// ValidateTopic reports why topic is not a valid topic name, or nil.
//
// A topic is 1 to 256 UTF-16 code units of valid UTF-8 with no control
// characters, double quotes or backslashes. Anything else (dots, '*', '>',
// spaces, ':', any Unicode) is allowed.
func ValidateTopic(topic string) error {
	if err := validateName(topic); err != nil {
		return fmt.Errorf("%w %q: %s", ErrInvalidTopic, clip(topic), err)
	}
	return nil
}

// ValidateEvent reports why event is not a valid event name, or nil. The
// rules are those of ValidateTopic: an event may not break the JSON envelope.
func ValidateEvent(event string) error {
	if err := validateName(event); err != nil {
		return fmt.Errorf("%w %q: %s", ErrInvalidEvent, clip(event), err)
	}
	return nil
}

// IsReserved reports whether topic is a system topic (prefix "__").
func IsReserved(topic string) bool { return strings.HasPrefix(topic, ReservedPrefix) }

type nameError string

func (e nameError) Error() string { return string(e) }

func validateName(s string) error {
	if s == "" {
		return nameError("empty")
	}
	if len(s) > 4*MaxNameLength { // cheap upper bound before decoding
		return nameError("longer than 256 characters")
	}
	units := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c < 0x20 || c == 0x7f:
				return nameError(fmt.Sprintf("control character at byte %d", i))
			case c == '"' || c == '\\':
				return nameError(fmt.Sprintf("%q at byte %d", c, i))
			}
			units++
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			return nameError(fmt.Sprintf("invalid UTF-8 at byte %d", i))
		}
		if r >= 0x80 && r < 0xa0 { // C1 controls
			return nameError(fmt.Sprintf("control character at byte %d", i))
		}
		if r > 0xffff {
			units += 2
		} else {
			units++
		}
		i += size
	}
	if units > MaxNameLength {
		return nameError("longer than 256 characters")
	}
	return nil
}

// clip shortens s for error messages.
func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}
