package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Leases is fabric.LeaseStore on Redis: a lease is the string
// "<prefix>:{P}:l:<name>" holding the holder's name with the lease's ttl
// (millisecond resolution). Acquire is one script (take the key if it is
// absent or the holder's, with a new ttl), Release another (delete it if it
// is the holder's), so of two instances racing for a lease exactly one
// wins, and a holder that stops refreshing loses it when Redis expires the
// key. It starts no goroutine.
type Leases struct{ b *Backend }

// Leases returns the backend's lease store (the same for every call).
func (b *Backend) Leases() *Leases { return b.leases }

// Acquire implements fabric.LeaseStore. ttl must be positive.
func (l *Leases) Acquire(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if ttl <= 0 {
		return false, fmt.Errorf("redis: lease %q: ttl %v is not positive", clip(name), ttl)
	}
	if holder == "" {
		return false, fmt.Errorf("redis: lease %q: empty holder", clip(name))
	}
	key := l.b.key(l.b.partition(name), "l", name)
	var got int64
	err := l.b.callIdempotent(ctx, "lease acquire "+strconv.Quote(clip(name)), func(ctx context.Context) error {
		var err error
		got, err = acquireScript.run(ctx, l.b.client, []string{key}, []string{holder, strconv.FormatInt(ms(ttl), 10)}).AsInt64()
		return err
	})
	return got == 1, err
}

// Release implements fabric.LeaseStore: it gives name up if holder has it,
// and does nothing otherwise.
func (l *Leases) Release(ctx context.Context, name, holder string) error {
	if holder == "" {
		return errors.New("redis: lease release: empty holder")
	}
	key := l.b.key(l.b.partition(name), "l", name)
	return l.b.callIdempotent(ctx, "lease release "+strconv.Quote(clip(name)), func(ctx context.Context) error {
		return releaseScript.run(ctx, l.b.client, []string{key}, []string{holder}).Error()
	})
}

var _ fabric.LeaseStore = (*Leases)(nil)
