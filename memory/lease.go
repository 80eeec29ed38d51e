package memory

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
)

// Leases is fabric.LeaseStore on a Backend: one holder per name, until it
// releases the lease or lets its ttl pass without a refresh. Expired leases
// are forgotten by the backend's sweep.
type Leases struct {
	b  *Backend
	mu sync.Mutex
	m  map[string]lease
}

type lease struct {
	holder string
	exp    int64 // Backend.now() at which the lease ends
}

// Leases returns the backend's lease store (the same for every call).
func (b *Backend) Leases() *Leases { return b.leases }

// Acquire implements fabric.LeaseStore. ttl must be positive.
func (l *Leases) Acquire(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if ttl <= 0 {
		return false, fmt.Errorf("memory: lease %q: ttl %v is not positive", clip(name), ttl)
	}
	if holder == "" {
		return false, errors.New("memory: lease: empty holder")
	}
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("memory: lease %q: %w", clip(name), err)
	}
	if l.b.closed.Load() {
		return false, fmt.Errorf("memory: lease %q: %w", clip(name), ErrClosed)
	}
	now := l.b.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.m[name]; ok && cur.exp > now && cur.holder != holder {
		return false, nil
	}
	l.m[name] = lease{holder: holder, exp: now + int64(ttl)}
	return true, nil
}

// Release implements fabric.LeaseStore: it gives name up if holder has it,
// and does nothing otherwise.
func (l *Leases) Release(_ context.Context, name, holder string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.m[name]; ok && cur.holder == holder {
		delete(l.m, name)
	}
	return nil
}

// Holder returns who holds name now ("" when nobody does).
func (l *Leases) Holder(name string) string {
	now := l.b.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.m[name]; ok && cur.exp > now {
		return cur.holder
	}
	return ""
}

// sweep forgets expired leases.
func (l *Leases) sweep(now int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for name, cur := range l.m {
		if cur.exp <= now {
			delete(l.m, name)
		}
	}
}

var _ fabric.LeaseStore = (*Leases)(nil)
