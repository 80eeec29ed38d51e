package jetstream

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LeaseOptions configures NewLeaseStore. The zero value has the defaults.
type LeaseOptions struct {
	// Prefix is the Fabric subject prefix (default "fabric"); the bucket is
	// "<prefix>_leases" unless Bucket says otherwise.
	Prefix string
	// Bucket names the KV bucket (default "<prefix>_leases").
	Bucket string
	// Replicas of the bucket (default 1). Use 3 in a cluster of 3 or more so
	// that a lease survives the loss of an instance.
	Replicas int
}

// leaseMarkerTTL is how long the marker of a released or expired lease
// stays in the bucket (the bucket's LimitMarkerTTL).
const leaseMarkerTTL = time.Second

// leaseAttempts bounds the read-then-write rounds of one Acquire while
// other writers keep changing the key.
const leaseAttempts = 4

// LeaseStore is fabric.LeaseStore on a JetStream KV bucket with per-key
// TTLs: a lease is one key (the name, encoded as a KV token) holding the
// holder's name, written with the lease's ttl (whole seconds, rounded up),
// so that a holder that stops refreshing loses it when JetStream expires the
// key.
//
// Every write is conditional on the key's last revision (JetStream's
// expected last subject sequence): taking a free lease succeeds only if
// the key is still absent (or still the marker of a release or expiry),
// and a refresh or a release only if nobody has written the key since it
// was read. Of two instances racing for one lease, exactly one wins.
type LeaseStore struct {
	js        jetstream.JetStream
	kv        jetstream.KeyValue
	bucket    string
	putPrefix string
}

// NewLeaseStore opens (or creates) the lease bucket. A LeaseStore starts no
// goroutine and needs no Close.
func NewLeaseStore(ctx context.Context, js jetstream.JetStream, opts LeaseOptions) (*LeaseStore, error) {
	if js == nil {
		return nil, errors.New("jetstream: lease store needs a JetStream context")
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Bucket == "" {
		opts.Bucket = nameToken(opts.Prefix) + "_leases"
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	kv, err := ensureTTLBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:         opts.Bucket,
		Description:    "Fabric leases: one holder per name, expiring unless refreshed",
		History:        1,
		Storage:        jetstream.FileStorage,
		Replicas:       opts.Replicas,
		LimitMarkerTTL: leaseMarkerTTL,
	})
	if err != nil {
		return nil, fmt.Errorf("jetstream: lease store: %w", err)
	}
	return &LeaseStore{js: js, kv: kv, bucket: opts.Bucket, putPrefix: kvPutPrefix(js, opts.Bucket)}, nil
}

// Bucket returns the name of the KV bucket.
func (s *LeaseStore) Bucket() string { return s.bucket }

// Acquire implements fabric.LeaseStore: it takes name for holder if nobody
// has it, or refreshes holder's lease, for ttl (rounded up to whole
// seconds). It returns false with a nil error when another holder has the
// lease, and an error wrapping fabric.ErrBackendUnavailable when JetStream
// cannot be reached.
func (s *LeaseStore) Acquire(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if ttl <= 0 {
		return false, fmt.Errorf("jetstream: lease %q: ttl %v is not positive", clip(name), ttl)
	}
	if holder == "" {
		return false, fmt.Errorf("jetstream: lease %q: empty holder", clip(name))
	}
	key := kvToken(name)
	d := ttlSeconds(ttl)
	for range leaseAttempts {
		e, err := s.kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound): // absent, released or expired
			// Create writes on the key's marker, if any, keeping the TTL.
			_, err = s.kv.Create(ctx, key, []byte(holder), jetstream.KeyTTL(d))
			if err == nil {
				return true, nil
			}
			if !casConflict(err) {
				return false, leaseError("acquire", name, err)
			}
			continue // someone else created it first: see who
		case err != nil:
			return false, leaseError("acquire", name, err)
		case string(e.Value()) != holder:
			return false, nil
		}
		// holder's lease: refresh it with a TTL (an Update would drop it),
		// unless the key changed since the read.
		m := nats.NewMsg(s.putPrefix + key)
		m.Data = []byte(holder)
		_, err = s.js.PublishMsg(ctx, m, jetstream.WithMsgTTL(d), jetstream.WithExpectLastSequencePerSubject(e.Revision()))
		if err == nil {
			return true, nil
		}
		if !casConflict(err) {
			return false, leaseError("refresh", name, err)
		}
	}
	// The key kept changing under us: report what it holds now.
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, leaseError("acquire", name, err)
	}
	return string(e.Value()) == holder, nil
}

// Release implements fabric.LeaseStore: it removes the lease if holder has
// it (and nobody took it over meanwhile); otherwise it does nothing.
func (s *LeaseStore) Release(ctx context.Context, name, holder string) error {
	key := kvToken(name)
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return leaseError("release", name, err)
	}
	if string(e.Value()) != holder {
		return nil
	}
	err = s.kv.Purge(ctx, key, jetstream.LastRevision(e.Revision()), jetstream.PurgeTTL(leaseMarkerTTL))
	if err != nil && !casConflict(err) {
		return leaseError("release", name, err)
	}
	return nil
}

// casConflict reports a conditional write refused because the key changed:
// JetStream's wrong last sequence (10071, or 10164 on replicated streams).
func casConflict(err error) bool {
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return true
	}
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// leaseError wraps err; anything but a request JetStream refused (a 400)
// means the store is unreachable or leaderless: fabric.ErrBackendUnavailable.
func leaseError(op, name string, err error) error {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != 400 {
		err = unavailable(err)
	}
	return fmt.Errorf("jetstream: lease %s %q: %w", op, clip(name), err)
}

var _ fabric.LeaseStore = (*LeaseStore)(nil)
