package jetstream

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// kvToken encodes s as one token that is valid both in a KV key
// (^[-/_=.a-zA-Z0-9]+$ without dots here) and in a NATS subject. The
// mapping is injective:
//   - 1 to 128 bytes of [A-Za-z0-9_-] are their own token;
//   - other strings of up to 96 bytes are "=" + base64url(s);
//   - longer strings are "==" + base64url(sha256(s)).
//
// base64url without padding never contains '=', so the three forms never
// collide. Tokens are never decoded: the original strings travel in values.
func kvToken(s string) string {
	if len(s) > 0 && len(s) <= 128 && plainToken(s) {
		return s
	}
	if len(s) <= 96 {
		return "=" + base64.RawURLEncoding.EncodeToString([]byte(s))
	}
	sum := sha256.Sum256([]byte(s))
	return "==" + base64.RawURLEncoding.EncodeToString(sum[:])
}

func plainToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// nameToken turns a subject prefix into something valid in a stream or
// bucket name (^[a-zA-Z0-9_-]+$).
func nameToken(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// kvPutPrefix returns the subject prefix on which a raw publish stores a key
// of bucket, honouring the JetStream context's domain or API prefix as
// nats.go's KeyValue does.
func kvPutPrefix(js jetstream.JetStream, bucket string) string {
	o := js.Options()
	pre := ""
	switch {
	case o.Domain != "":
		pre = "$JS." + o.Domain + ".API."
	case o.APIPrefix != "" && o.APIPrefix != jetstream.DefaultAPIPrefix:
		pre = o.APIPrefix
		if !strings.HasSuffix(pre, ".") {
			pre += "."
		}
	}
	return pre + "$KV." + bucket + "."
}

// ttlSeconds rounds d up to whole seconds, at least one: JetStream message
// TTLs and marker TTLs have a resolution of one second.
func ttlSeconds(d time.Duration) time.Duration {
	if d < time.Second {
		return time.Second
	}
	return (d + time.Second - 1).Truncate(time.Second)
}

// ensureTTLBucket opens bucket, creating it with per-key TTLs (limit
// markers) if it does not exist. Concurrent creators and a JetStream that is
// still electing its leaders are retried until ctx ends; a configuration the
// server refuses for good fails at once.
func ensureTTLBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	var last error
	for {
		kv, err := js.CreateKeyValue(ctx, cfg)
		if err == nil {
			return kv, nil
		}
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			kv, gerr := js.KeyValue(ctx, cfg.Bucket)
			if gerr == nil {
				st, serr := kv.Status(ctx)
				if serr == nil && st.LimitMarkerTTL() <= 0 {
					return nil, fmt.Errorf("bucket %s exists without per-key TTLs (LimitMarkerTTL); delete it or pick another prefix", cfg.Bucket)
				}
				return kv, nil
			}
			err = gerr
		}
		if errors.Is(err, jetstream.ErrLimitMarkerTTLNotSupported) {
			return nil, fmt.Errorf("bucket %s: the NATS server is too old for per-key TTLs (needs 2.11+): %w", cfg.Bucket, err)
		}
		if permanent(err) { // a bad configuration, or no JetStream: retrying cannot help
			return nil, fmt.Errorf("bucket %s: %w", cfg.Bucket, err)
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("bucket %s: %w (last error: %v)", cfg.Bucket, ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// permanent reports a stream error that retrying cannot cure (a bad or
// conflicting configuration, no JetStream at all), as opposed to a
// JetStream not ready yet.
func permanent(err error) bool {
	if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) ||
		errors.Is(err, nats.ErrNoResponders) { // no server answers the JetStream API
		return true
	}
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	const replicasNotSupported = 10074 // replicas > 1 on a server that is not clustered
	return apiErr.Code == 400 || apiErr.ErrorCode == replicasNotSupported
}

// logFailure logs a failed NATS operation: as a warning, or at debug level
// once the connection is closed for good (the owner is shutting down).
func logFailure(log *slog.Logger, msg string, err error, args ...any) {
	args = append(args, "err", err)
	if errors.Is(err, nats.ErrConnectionClosed) {
		log.Debug(msg, args...)
		return
	}
	log.Warn(msg, args...)
}

// ackDrainer waits for the acknowledgements of asynchronous publishes whose
// callers do not wait themselves and logs the failures. One goroutine, owned
// by the extension that made it.
type ackDrainer struct {
	ch   chan pendingAck
	done chan struct{}
	wg   sync.WaitGroup
	log  *slog.Logger
}

type pendingAck struct {
	f    jetstream.PubAckFuture
	what string
	at   time.Time
}

// ackWait bounds the wait for one acknowledgement: nats.go futures have no
// timeout of their own unless the JetStream context was given one.
const ackWait = 10 * time.Second

func newAckDrainer(log *slog.Logger) *ackDrainer {
	d := &ackDrainer{ch: make(chan pendingAck, 4096), done: make(chan struct{}), log: log}
	d.wg.Add(1)
	go d.run()
	return d
}

// add hands f to the drainer; it gives up once the drainer is stopped.
func (d *ackDrainer) add(f jetstream.PubAckFuture, what string) {
	if f == nil {
		return
	}
	select {
	case d.ch <- pendingAck{f, what, time.Now()}:
	case <-d.done:
	}
}

func (d *ackDrainer) run() {
	defer d.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case p := <-d.ch:
			timer.Reset(max(time.Until(p.at.Add(ackWait)), time.Millisecond))
			select {
			case <-p.f.Ok():
			case err := <-p.f.Err():
				logFailure(d.log, "jetstream: asynchronous write failed", err, "what", p.what, "subject", p.f.Msg().Subject)
			case <-timer.C:
				d.log.Warn("jetstream: asynchronous write not acknowledged", "what", p.what, "subject", p.f.Msg().Subject, "after", ackWait)
			case <-d.done:
				return
			}
		case <-d.done:
			return
		}
	}
}

func (d *ackDrainer) stop() {
	close(d.done)
	d.wg.Wait()
}

// seqWaiter lets callers wait until a watcher has applied a stream sequence,
// so that a write is visible in this instance's view when the call returns.
type seqWaiter struct {
	mu    sync.Mutex
	seq   uint64
	waits []seqWait
}

type seqWait struct {
	seq uint64
	ch  chan struct{}
}

func (w *seqWaiter) advance(seq uint64) {
	w.mu.Lock()
	if seq > w.seq {
		w.seq = seq
	}
	if len(w.waits) > 0 {
		kept := w.waits[:0]
		for _, x := range w.waits {
			if x.seq <= w.seq {
				close(x.ch)
			} else {
				kept = append(kept, x)
			}
		}
		clear(w.waits[len(kept):])
		w.waits = kept
	}
	w.mu.Unlock()
}

func (w *seqWaiter) wait(ctx context.Context, seq uint64) error {
	w.mu.Lock()
	if w.seq >= seq {
		w.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	w.waits = append(w.waits, seqWait{seq, ch})
	w.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// clip shortens s for error messages.
func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}
