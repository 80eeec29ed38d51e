package api

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/fabricrt/fabric/fabric"
)

// message is one message of a publish, batch or broadcast.
type message struct {
	topic, event string
	data         []byte // raw JSON from the body; nil: null
	persist      bool

	seq uint64 // the answer
	err *Error // why it was not published
}

var errTooMany = errors.New("too many items")

// badBody is the error of a body that does not decode.
func badBody(err error, shape string) *Error {
	return newError(CodeBadRequest, "body must be JSON "+shape+": "+err.Error())
}

// field decodes one field of a message. prev is the message before it in
// a batch: its topic and event strings are reused when they repeat.
func (m *message) field(d *decoder, key []byte, prev *message) error {
	var err error
	switch string(key) {
	case "topic":
		m.topic, err = d.stringReuse("topic", prev, func(p *message) string { return p.topic })
	case "event":
		m.event, err = d.stringReuse("event", prev, func(p *message) string { return p.event })
	case "data":
		m.data, err = d.raw()
	case "persist":
		m.persist, err = d.boolValue("persist")
	default:
		err = d.skip(0)
	}
	return err
}

// stringReuse reads a string like stringValue, returning prev's when it is
// the same (no allocation for the topic of every message of a batch).
func (d *decoder) stringReuse(what string, prev *message, get func(*message) string) (string, error) {
	if prev == nil || d.peek() != '"' {
		return d.stringValue(what)
	}
	start := d.i
	raw, esc, err := d.str()
	if err != nil {
		return "", err
	}
	if p := get(prev); !esc && p == string(raw) {
		return p, nil
	}
	d.i = start
	return d.stringValue(what)
}

// check validates a message to publish.
func (h *handler) check(m *message) *Error {
	if err := fabric.ValidateTopic(m.topic); err != nil {
		return newError(CodeInvalidTopic, err.Error())
	}
	if fabric.IsReserved(m.topic) {
		return newError(CodeReservedTopic, "topic "+quote(m.topic)+" is reserved (prefix __)")
	}
	if err := fabric.ValidateEvent(m.event); err != nil {
		return newError(CodeInvalidEvent, err.Error())
	}
	if m.persist && h.node.History() == nil {
		return newError(CodeNoHistory, fabric.ErrNoHistory.Error())
	}
	return nil
}

// envelopeSize is an upper bound of m's envelope.
func envelopeSize(m *message) int { return len(m.topic) + len(m.event) + max(len(m.data), 4) + 32 }

func (m *message) dataJSON() []byte {
	if len(m.data) == 0 {
		return null
	}
	return m.data
}

var null = []byte("null")

// publishEnvelope publishes m's envelope.
func (h *handler) publishEnvelope(ctx context.Context, m *message, env []byte) (uint64, error) {
	if m.persist {
		return h.node.PublishEnvelope(ctx, m.topic, env, fabric.Persist())
	}
	return h.node.PublishEnvelope(ctx, m.topic, env)
}

// publish: {"topic","event","data"[,"persist":true]} → {"ok":true[,"seq":N]}.
func (h *handler) publish(ctx context.Context, s *scratch) *Error {
	var m message
	d := decoder{b: s.body}
	if err := d.body(func(key []byte) error { return m.field(&d, key, nil) }); err != nil {
		return badBody(err, `{"topic","event","data"}`)
	}
	if e := h.check(&m); e != nil {
		return e
	}
	env := fabric.AppendEnvelope(make([]byte, 0, envelopeSize(&m)), m.topic, m.event, m.dataJSON())
	seq, err := h.publishEnvelope(ctx, &m, env)
	if err != nil {
		h.log.Warn("api publish failed", "topic", m.topic, "err", err)
		return newError(CodeUnavailable, "publish failed: "+err.Error())
	}
	s.out = appendSeq(s.out, seq)
	return nil
}

// batch: {"messages":[{"topic","event","data"[,"persist"]},...]} →
// {"ok":true,"results":[{"ok":true[,"seq":N]} or {"error":{...}},...]}, in
// order. Messages are published one after the other, in order; a
// non-persistent one does not wait for the backend, a persistent one waits
// for the history's ack.
func (h *handler) batch(ctx context.Context, s *scratch) *Error {
	d := decoder{b: s.body}
	msgs := s.msgs[:0]
	err := d.body(func(key []byte) error {
		if string(key) != "messages" {
			return d.skip(0)
		}
		msgs = msgs[:0]
		return d.array(func() error {
			if len(msgs) == h.opts.MaxBatch {
				return errTooMany
			}
			msgs = append(msgs, message{})
			m := &msgs[len(msgs)-1]
			var prev *message
			if len(msgs) > 1 {
				prev = &msgs[len(msgs)-2]
			}
			return d.object(func(k []byte) error { return m.field(&d, k, prev) })
		})
	})
	s.msgs = msgs
	if errors.Is(err, errTooMany) {
		return newError(CodeTooManyItems, "a batch carries at most "+strconv.Itoa(h.opts.MaxBatch)+" messages")
	}
	if err != nil {
		return badBody(err, `{"messages":[{"topic","event","data"},...]}`)
	}
	size := 0
	for i := range msgs {
		m := &msgs[i]
		if m.err = h.check(m); m.err == nil {
			size += envelopeSize(m)
		}
	}
	h.publishAll(ctx, msgs, size, func(dst []byte, m *message) []byte {
		return fabric.AppendEnvelope(dst, m.topic, m.event, m.dataJSON())
	})
	s.out = appendResults(s.out, msgs)
	return nil
}

// broadcast: {"topics":[...],"event","data"[,"persist"]} → the answer of a
// batch, one result per topic: the same event and data, encoded once, on
// every topic.
func (h *handler) broadcast(ctx context.Context, s *scratch) *Error {
	d := decoder{b: s.body}
	msgs := s.msgs[:0]
	var shared message
	err := d.body(func(key []byte) error {
		if string(key) != "topics" {
			return shared.field(&d, key, nil)
		}
		msgs = msgs[:0]
		return d.array(func() error {
			if len(msgs) == h.opts.MaxBatch {
				return errTooMany
			}
			topic, err := d.stringValue("a topic")
			msgs = append(msgs, message{topic: topic})
			return err
		})
	})
	s.msgs = msgs
	if errors.Is(err, errTooMany) {
		return newError(CodeTooManyItems, "a broadcast reaches at most "+strconv.Itoa(h.opts.MaxBatch)+" topics")
	}
	if err != nil {
		return badBody(err, `{"topics":[...],"event","data"}`)
	}
	if err := fabric.ValidateEvent(shared.event); err != nil {
		return newError(CodeInvalidEvent, err.Error())
	}
	if shared.persist && h.node.History() == nil {
		return newError(CodeNoHistory, fabric.ErrNoHistory.Error())
	}
	data := shared.dataJSON()
	size := 0
	for i := range msgs {
		m := &msgs[i]
		m.event, m.data, m.persist = shared.event, shared.data, shared.persist
		if m.err = h.check(m); m.err == nil {
			size += envelopeSize(m)
		}
	}
	h.publishAll(ctx, msgs, size, func(dst []byte, m *message) []byte {
		return fabric.AppendEnvelope(dst, m.topic, m.event, data)
	})
	s.out = appendResults(s.out, msgs)
	return nil
}

// publishAll publishes every valid message of msgs in order, within the
// handler's timeout, their envelopes built by build into one allocation of
// size bytes, and records each result.
func (h *handler) publishAll(ctx context.Context, msgs []message, size int, build func(dst []byte, m *message) []byte) {
	if size == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, h.opts.Timeout)
	defer cancel()
	slab := make([]byte, 0, size)
	failed := 0
	var last error
	for i := range msgs {
		m := &msgs[i]
		if m.err != nil {
			continue
		}
		start := len(slab)
		slab = build(slab, m)
		env := slab[start:len(slab):len(slab)]
		seq, err := h.publishEnvelope(ctx, m, env)
		if err != nil {
			m.err = newError(CodeUnavailable, "publish failed: "+err.Error())
			failed++
			last = err
			continue
		}
		m.seq = seq
	}
	if failed > 0 {
		h.log.Warn("api publishes failed", "failed", failed, "of", len(msgs), "last_err", last)
	}
}

func appendResults(out []byte, msgs []message) []byte {
	out = append(appendField(out, "results"), '[')
	for i := range msgs {
		if i > 0 {
			out = append(out, ',')
		}
		out = appendResult(out, &msgs[i])
	}
	return append(out, ']')
}

// history: {"topic"[,"since":N][,"limit":N]} → {"ok":true,"messages":
// [{"seq","event","data"},...],"epoch","complete","more"}: the retained
// messages after since, oldest first.
func (h *handler) history(ctx context.Context, s *scratch) *Error {
	if h.node.History() == nil {
		return newError(CodeNotEnabled, "history is not enabled on this server")
	}
	var topic string
	var since, limit uint64
	d := decoder{b: s.body}
	err := d.body(func(key []byte) error {
		var err error
		switch string(key) {
		case "topic":
			topic, err = d.stringValue("topic")
		case "since":
			since, err = d.uintValue("since")
		case "limit":
			limit, err = d.uintValue("limit")
		default:
			err = d.skip(0)
		}
		return err
	})
	if err != nil {
		return badBody(err, `{"topic","since","limit"}`)
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return newError(CodeInvalidTopic, err.Error())
	}
	n := DefaultHistoryLimit
	if limit > 0 {
		n = int(min(limit, uint64(h.opts.MaxHistoryLimit)))
	}
	n = min(n, h.opts.MaxHistoryLimit)
	ctx, cancel := context.WithTimeout(ctx, h.opts.Timeout)
	defer cancel()
	rng, err := h.node.Since(ctx, topic, since, n)
	if errors.Is(err, fabric.ErrNoHistory) {
		return newError(CodeNotEnabled, "history is not enabled on this server")
	}
	if err != nil {
		return h.unavailable("history read", err)
	}
	out := append(appendField(s.out, "messages"), '[')
	for i, m := range rng.Messages {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, `{"seq":`...)
		out = strconv.AppendUint(out, m.Seq, 10)
		_, event, data, ok := fabric.SplitEnvelope(m.Envelope)
		if !ok { // not an envelope of ours: hand it over whole
			event, data = nil, m.Envelope
		}
		out = append(out, `,"event":"`...)
		out = append(out, event...) // a validated event: nothing to escape
		out = append(out, `","data":`...)
		out = append(out, data...)
		out = append(out, '}')
	}
	out = append(out, ']')
	out = appendString(appendField(out, "epoch"), rng.Epoch)
	out = appendBool(appendField(out, "complete"), rng.Complete)
	s.out = appendBool(appendField(out, "more"), rng.More)
	return nil
}

// topicRequest decodes {"topic"} (with user when withUser).
func topicRequest(s *scratch, withUser bool) (topic, user string, e *Error) {
	d := decoder{b: s.body}
	err := d.body(func(key []byte) error {
		var err error
		switch {
		case string(key) == "topic":
			topic, err = d.stringValue("topic")
		case withUser && string(key) == "user":
			user, err = d.userValue()
		default:
			err = d.skip(0)
		}
		return err
	})
	if err != nil {
		shape := `{"topic"}`
		if withUser {
			shape = `{"user","topic"}`
		}
		return "", "", badBody(err, shape)
	}
	if err := fabric.ValidateTopic(topic); err != nil {
		return "", "", newError(CodeInvalidTopic, err.Error())
	}
	if withUser {
		if e := checkUser(user); e != nil {
			return "", "", e
		}
	}
	return topic, user, nil
}

// userValue reads a user id: a string, or an integer (its decimal text,
// as fabric.UserKey writes numeric ids).
func (d *decoder) userValue() (string, error) {
	if c := d.peek(); c == '-' || c >= '0' && c <= '9' {
		start := d.i
		if err := d.number(); err != nil {
			return "", err
		}
		if v, err := strconv.ParseInt(string(d.b[start:d.i]), 10, 64); err == nil {
			return strconv.FormatInt(v, 10), nil
		}
		if v, err := strconv.ParseUint(string(d.b[start:d.i]), 10, 64); err == nil {
			return strconv.FormatUint(v, 10), nil
		}
		d.i = start
		return "", d.fail("user must be a string or an integer")
	}
	return d.stringValue("user")
}

func checkUser(user string) *Error {
	switch {
	case user == "":
		return newError(CodeBadRequest, "user is required")
	case len(user) > MaxUserLength:
		return newError(CodeBadRequest, "user is longer than "+strconv.Itoa(MaxUserLength)+" bytes")
	}
	return nil
}

// presenceList: {"topic"} → {"ok":true,"members":[{"key","data"},...]}.
func (h *handler) presenceList(ctx context.Context, s *scratch) *Error {
	if h.presence == nil {
		return newError(CodeNotEnabled, "presence is not enabled on this server")
	}
	topic, _, e := topicRequest(s, false)
	if e != nil {
		return e
	}
	members, err := h.presence.List(ctx, topic)
	if err != nil {
		return h.internal("presence", err)
	}
	slices.SortFunc(members, func(a, b fabric.PresenceMember) int { return strings.Compare(a.Key, b.Key) })
	out := append(appendField(s.out, "members"), '[')
	for i, m := range members {
		if i > 0 {
			out = append(out, ',')
		}
		out = appendString(append(out, `{"key":`...), m.Key)
		out = append(out, `,"data":`...)
		if len(m.Data) == 0 {
			out = append(out, null...)
		} else {
			out = append(out, m.Data...)
		}
		out = append(out, '}')
	}
	s.out = append(out, ']')
	return nil
}

// needCluster refuses cluster methods without a cluster view.
func (h *handler) needCluster() *Error {
	if h.cluster == nil {
		return newError(CodeNotEnabled, "no cluster view is configured on this server")
	}
	return nil
}

// clusterErr sorts a ClusterView error: a partial answer is still an
// answer (partial reports it), anything else fails the call.
func (h *handler) clusterErr(what string, err error) (partial bool, e *Error) {
	if err == nil {
		return false, nil
	}
	if errors.Is(err, fabric.ErrPartialCluster) {
		h.log.Warn("api: partial cluster answer", "method", what, "err", err)
		return true, nil
	}
	return false, h.unavailable(what, err)
}

func appendPartial(out []byte, partial bool) []byte {
	if partial {
		return append(out, `,"partial":true`...)
	}
	return out
}

// channels: {["pattern"][,"limit"]} → {"ok":true,"channels":{topic:count},
// "truncated":bool}: the topics with subscribers anywhere, matching pattern,
// the first limit in byte order.
func (h *handler) channels(ctx context.Context, s *scratch) *Error {
	if e := h.needCluster(); e != nil {
		return e
	}
	var pattern string
	var limit uint64
	d := decoder{b: s.body}
	err := d.body(func(key []byte) error {
		var err error
		switch string(key) {
		case "pattern":
			pattern, err = d.stringValue("pattern")
		case "limit":
			limit, err = d.uintValue("limit")
		default:
			err = d.skip(0)
		}
		return err
	})
	if err != nil {
		return badBody(err, `{"pattern","limit"}`)
	}
	if len(pattern) > MaxPatternLength {
		return newError(CodeBadRequest, "pattern is longer than "+strconv.Itoa(MaxPatternLength)+" bytes")
	}
	counts, truncated, err := h.cluster.Channels(ctx, pattern, int(min(limit, fabric.MaxChannelsLimit)))
	partial, e := h.clusterErr("channels", err)
	if e != nil {
		return e
	}
	topics := make([]string, 0, len(counts))
	for t := range counts {
		topics = append(topics, t)
	}
	slices.Sort(topics)
	out := append(appendField(s.out, "channels"), '{')
	for i, t := range topics {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(appendString(out, t), ':')
		out = strconv.AppendInt(out, int64(counts[t]), 10)
	}
	out = append(out, '}')
	out = appendBool(appendField(out, "truncated"), truncated)
	s.out = appendPartial(out, partial)
	return nil
}

// info: {} → {"ok":true,"instances":[{"id","name","version","connections",
// "subscriptions","topics","uptime"},...]} (uptime in seconds).
func (h *handler) info(ctx context.Context, s *scratch) *Error {
	if e := h.needCluster(); e != nil {
		return e
	}
	d := decoder{b: s.body}
	if err := d.body(func([]byte) error { return d.skip(0) }); err != nil {
		return badBody(err, `{}`)
	}
	infos, err := h.cluster.Info(ctx)
	partial, e := h.clusterErr("info", err)
	if e != nil {
		return e
	}
	out := append(appendField(s.out, "instances"), '[')
	for i, in := range infos {
		if i > 0 {
			out = append(out, ',')
		}
		out = appendString(append(out, `{"id":`...), in.ID)
		out = appendString(appendField(out, "name"), in.Name)
		out = appendString(appendField(out, "version"), in.Version)
		out = strconv.AppendInt(appendField(out, "connections"), int64(in.Connections), 10)
		out = strconv.AppendInt(appendField(out, "subscriptions"), int64(in.Subscriptions), 10)
		out = strconv.AppendInt(appendField(out, "topics"), int64(in.Topics), 10)
		out = strconv.AppendInt(appendField(out, "uptime"), int64(in.Uptime.Seconds()), 10)
		out = append(out, '}')
	}
	out = append(out, ']')
	s.out = appendPartial(out, partial)
	return nil
}

// DefaultCloseCode is the close code of a disconnect that names none.
const DefaultCloseCode = 1000

// validCloseCode reports the close codes a server may send: 1000 (normal),
// 1001 (going away), 1008 (policy), 1011 (error), 1012 (restart), 1013 (try
// again later), and the application range 3000–4999.
func validCloseCode(code uint64) bool {
	switch code {
	case 1000, 1001, 1008, 1011, 1012, 1013:
		return true
	}
	return code >= 3000 && code <= 4999
}

// disconnect: {"user"[,"code"][,"reason"]} → {"ok":true,"disconnected":N}:
// every connection of the user, on every instance, closed with code.
func (h *handler) disconnect(ctx context.Context, s *scratch) *Error {
	if e := h.needCluster(); e != nil {
		return e
	}
	var user, reason string
	var code uint64
	d := decoder{b: s.body}
	err := d.body(func(key []byte) error {
		var err error
		switch string(key) {
		case "user":
			user, err = d.userValue()
		case "code":
			code, err = d.uintValue("code")
		case "reason":
			reason, err = d.stringValue("reason")
		default:
			err = d.skip(0)
		}
		return err
	})
	if err != nil {
		return badBody(err, `{"user","code","reason"}`)
	}
	if e := checkUser(user); e != nil {
		return e
	}
	if code == 0 {
		code = DefaultCloseCode
	}
	if !validCloseCode(code) {
		return newError(CodeBadRequest, "code must be 1000, 1001, 1008, 1011, 1012, 1013 or 3000–4999")
	}
	if len(reason) > MaxReasonLength || !utf8.ValidString(reason) {
		return newError(CodeBadRequest, "reason must be at most "+strconv.Itoa(MaxReasonLength)+" bytes of UTF-8")
	}
	n, err := h.cluster.Disconnect(ctx, user, int(code), reason)
	partial, e := h.clusterErr("disconnect", err)
	if e != nil {
		return e
	}
	s.out = appendPartial(strconv.AppendInt(appendField(s.out, "disconnected"), int64(n), 10), partial)
	return nil
}

// unsubscribe: {"user","topic"} → {"ok":true,"unsubscribed":N}: every
// connection of the user, on every instance, leaves topic.
func (h *handler) unsubscribe(ctx context.Context, s *scratch) *Error {
	if e := h.needCluster(); e != nil {
		return e
	}
	topic, user, e := topicRequest(s, true)
	if e != nil {
		return e
	}
	n, err := h.cluster.Unsubscribe(ctx, user, topic)
	partial, e := h.clusterErr("unsubscribe", err)
	if e != nil {
		return e
	}
	s.out = appendPartial(strconv.AppendInt(appendField(s.out, "unsubscribed"), int64(n), 10), partial)
	return nil
}
