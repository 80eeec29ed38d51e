package pgbridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/fabricrt/fabric/fabric"
)

// Message is what one notification publishes.
type Message struct {
	// Topic is the topic to publish on.
	Topic string
	// Event is the message's event name.
	Event string
	// Data is the message's data, JSON (nil: null).
	Data json.RawMessage
}

// ErrSkip, returned by a Route, drops a notification on purpose: it is
// counted (reason "skipped") but not logged.
var ErrSkip = errors.New("pgbridge: notification skipped")

// Errors of DefaultRoute; the reason a notification is counted under is
// given with each.
var (
	// ErrNotJSON: the payload does not parse as JSON (reason "not_json").
	ErrNotJSON = errors.New("payload is not JSON")
	// ErrShape: the payload is JSON but neither {"topic","event","data"}
	// nor {"table","op","row"} with a known op (reason "shape").
	ErrShape = errors.New(`payload is neither {"topic","event","data"} nor {"table","op","row"}`)
)

// Reasons a notification is counted as invalid
// (fabric_pg_notifications_invalid_total{reason}).
const (
	reasonNotJSON = "not_json"
	reasonShape   = "shape"
	reasonTopic   = "topic"
	reasonEvent   = "event"
	reasonData    = "data"
	reasonRoute   = "route"
	reasonSkipped = "skipped"
)

// DefaultRoute maps a notification's payload to a message:
//
//   - {"topic":T,"event":E,"data":D} is published as it is (data may be
//     absent: null);
//   - {"table":T,"op":O,"row":R}, what a row trigger sends (see
//     NotifyTriggerSQL), is published on topic T with event "created",
//     "updated" or "deleted" for O = INSERT, UPDATE or DELETE (any case;
//     "created", "updated", "deleted" are taken too) and data R.
//
// Anything else is an error wrapping ErrNotJSON or ErrShape. The channel is
// not used.
func DefaultRoute(_ string, payload []byte) (Message, error) {
	var p struct {
		Topic *string         `json:"topic"`
		Event *string         `json:"event"`
		Data  json.RawMessage `json:"data"`
		Table *string         `json:"table"`
		Op    *string         `json:"op"`
		Row   json.RawMessage `json:"row"`
	}
	if err := json.Unmarshal(payload, &p); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return Message{}, fmt.Errorf("%w: %v", ErrShape, err)
		}
		return Message{}, fmt.Errorf("%w: %v", ErrNotJSON, err)
	}
	switch {
	case p.Topic != nil:
		m := Message{Topic: *p.Topic, Data: p.Data}
		if p.Event != nil {
			m.Event = *p.Event
		}
		return m, nil
	case p.Table != nil && p.Op != nil:
		event := opEvent(*p.Op)
		if event == "" {
			return Message{}, fmt.Errorf("%w: unknown op %q", ErrShape, clip(*p.Op, 32))
		}
		return Message{Topic: *p.Table, Event: event, Data: p.Row}, nil
	}
	return Message{}, ErrShape
}

// opEvent returns the event of a trigger operation ("" for an unknown one).
func opEvent(op string) string {
	switch strings.ToLower(op) {
	case "insert", "created", "create":
		return "created"
	case "update", "updated":
		return "updated"
	case "delete", "deleted":
		return "deleted"
	}
	return ""
}

// invalidReason returns the metric reason of a Route error.
func invalidReason(err error) string {
	switch {
	case errors.Is(err, ErrSkip):
		return reasonSkipped
	case errors.Is(err, ErrNotJSON):
		return reasonNotJSON
	case errors.Is(err, ErrShape):
		return reasonShape
	}
	return reasonRoute
}

// envelope validates m and returns its wire envelope, or the reason it
// cannot be published and why.
func (m Message) envelope() ([]byte, string, error) {
	if err := fabric.ValidateTopic(m.Topic); err != nil {
		return nil, reasonTopic, err
	}
	if fabric.IsReserved(m.Topic) {
		// Any database role may NOTIFY: system topics stay out of reach,
		// as they are for the publish API.
		return nil, reasonTopic, fmt.Errorf("topic %q is reserved", clip(m.Topic, 64))
	}
	if err := fabric.ValidateEvent(m.Event); err != nil {
		return nil, reasonEvent, err
	}
	data := []byte(m.Data)
	if len(data) == 0 {
		data = []byte("null")
	} else if !json.Valid(data) {
		return nil, reasonData, fmt.Errorf("%w: not valid JSON", fabric.ErrInvalidData)
	}
	return fabric.Envelope(m.Topic, m.Event, data), "", nil
}

// clip shortens s for a log line.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
