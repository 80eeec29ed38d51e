package workers

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// File descriptors a worker inherits.
const (
	// ControlFD is the worker's end of the control socket pair.
	ControlFD = 3
	// FirstListenerFD is the first inherited listening socket; Init.Listeners
	// says how many follow it.
	FirstListenerFD = 4
)

// maxLine bounds one control message.
const maxLine = 1 << 20

// message is one line of the control protocol.
type message struct {
	// Type is "init" (primary → worker, first), "ping" (primary → worker)
	// or "pong" (worker → primary).
	Type string `json:"type"`
	// ID pairs a pong with its ping.
	ID uint64 `json:"id,omitempty"`
	// Init is the init message's content.
	Init *Init `json:"init,omitempty"`
	// Health is a pong's content.
	Health *Health `json:"health,omitempty"`
	// Primary is a ping's news of the primary (Options.PrimaryState).
	Primary json.RawMessage `json:"primary,omitempty"`
}

// Init is the first thing a worker learns from its primary.
type Init struct {
	// Slot is the worker's slot (0 ≤ Slot < Options.Workers); a replacement
	// gets the slot of the worker it replaces.
	Slot int `json:"slot"`
	// Listeners is how many listening sockets the worker inherits, from
	// FirstListenerFD on.
	Listeners int `json:"listeners"`
	// Gated is true when other workers serve the port: a rolling restart's
	// replacement, or a restart while other workers are ready. The new
	// worker's listeners then accept only once it calls StartAccepting,
	// so that no connection reaches it before it is ready (the kernel
	// queues the slot's connections meanwhile). The first workers accept
	// at once: their servers answer the probes while they start.
	Gated bool `json:"gated,omitempty"`
	// Data is the application's (Options.Init): for fabric serve, the URL
	// and token of the primary's NATS server.
	Data json.RawMessage `json:"data,omitempty"`
}

// Health is a worker's answer to a ping.
type Health struct {
	// Ready is true once the worker serves (its /readyz would say 200).
	Ready bool `json:"ready"`
	// Status says what a worker that is not ready waits for.
	Status string `json:"status,omitempty"`
	// Connections is how many client connections the worker holds.
	Connections int `json:"connections"`
}

// writeMsg writes m as one line within timeout.
func writeMsg(c net.Conn, m message, timeout time.Duration) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("workers: encode %s: %w", m.Type, err)
	}
	_ = c.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := c.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("workers: send %s: %w", m.Type, err)
	}
	return nil
}

// readMsg reads one line.
func readMsg(rd *bufio.Reader) (message, error) {
	var m message
	line, err := rd.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return m, errors.New("workers: control message too long")
	}
	if err != nil {
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return m, io.EOF
		}
		return m, fmt.Errorf("workers: read control message: %w", err)
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("workers: decode control message: %w", err)
	}
	return m, nil
}
