package redis

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"strconv"
	"sync"
	"time"

	"github.com/fabricrt/fabric/fabric"
	"github.com/redis/rueidis"
)

// History is fabric.History on Redis: per topic a hash with its epoch and
// last sequence ("<prefix>:{P}:hm:<topic>") and a stream of its retained
// messages ("<prefix>:{P}:hs:<topic>", ids "<seq>-0"), both in the topic's
// partition, so one Lua script (appendScript) assigns the sequence, stores
// the message, trims the stream and publishes the message on the topic's
// channel, atomically: subscribers on every instance get every stored
// message in sequence order, with the previous sequence as prev.
//
// Sequences are per topic and contiguous (1, 2, 3... in each epoch). An
// epoch names one incarnation of a topic's history: a random id stored in
// its hash when the topic's first message (or first read) creates it. When
// the keys are deleted (an operator, FLUSHDB, eviction under maxmemory, a
// restart of a Redis that keeps nothing on disk, or MaxAge passing with no
// message), the next message starts a new incarnation with a new epoch and
// sequences from 1 again.
//
// Append deduplicates by msgID (see Append): a retry with the same msgID
// after an error (a timeout, a connection cut: the script may have run)
// never stores twice. Without a msgID, such a retry may. What an
// acknowledged Append survives is what Redis's persistence keeps
// (docs/redis.md).
type History struct {
	b *Backend

	cacheOnce sync.Once
	cache     *epochCache
}

// History returns the backend's History (the same for every call). It
// delivers through the backend's Brokers: give a Node both.
func (b *Backend) History() *History { return b.history }

// keys returns topic's meta and stream keys.
func (h *History) keys(topic string) (meta, stream string, p int) {
	p = h.b.partition(topic)
	return h.b.key(p, "hm", topic), h.b.key(p, "hs", topic), p
}

// Append implements fabric.History: one script stores and publishes the
// message; the position is returned once Redis has run it and this
// instance's own subscribers of the topic (through the backend's Brokers)
// have been handed the message, as on NATS where the stored message and
// the acknowledgement share a connection (bounded by a second; not while
// the pub/sub connection is down). With a msgID,
// the script first looks for the key "<prefix>:{P}:hd:<len>:<topic><msgID>"
// (kept DedupeWindow with the position it was stored at): found, in the
// same epoch, Append returns that position and neither stores nor
// publishes again.
func (h *History) Append(ctx context.Context, topic string, envelope []byte, msgID string) (fabric.Position, error) {
	b := h.b
	meta, stream, p := h.keys(topic)
	keys := []string{meta, stream}
	windowMS := "0"
	if msgID != "" {
		keys = append(keys, b.key(p, "hd", strconv.Itoa(len(topic))+":"+topic+msgID))
		windowMS = strconv.FormatInt(ms(b.opts.DedupeWindow), 10)
	}
	args := []string{
		b.key(p, "t", topic),
		rueidis.BinaryString(envelope),
		strconv.Itoa(b.opts.MaxPerTopic),
		strconv.FormatInt(ageMS(b.opts.MaxAge), 10),
		b.newEpoch(),
		strconv.FormatInt(ms(b.opts.EmptyTopicTTL), 10),
		b.shardedFlag(),
		windowMS,
	}
	var pos fabric.Position
	run := b.call
	if msgID != "" {
		run = b.callIdempotent // the script deduplicates a second run
	}
	err := run(ctx, "append to "+strconv.Quote(clip(topic)), func(ctx context.Context) error {
		vs, err := appendScript.run(ctx, b.client, keys, args).ToArray()
		if err != nil {
			return err
		}
		if len(vs) < 2 {
			return errors.New("append: short reply")
		}
		seq, err := vs[0].AsInt64()
		if err != nil {
			return err
		}
		epoch, err := vs[1].ToString()
		if err != nil {
			return err
		}
		pos = fabric.Position{Seq: uint64(seq), Epoch: epoch}
		return nil
	})
	if err != nil {
		return fabric.Position{}, err
	}
	h.epochs().put(topic, pos.Epoch)
	b.awaitLocal(ctx, topic, pos.Seq)
	return pos, nil
}

// ageMS is MaxAge in milliseconds, 0 for none.
func ageMS(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return ms(d)
}

// Since implements fabric.History with one script: the retained messages
// after seq, at most limit of them. Complete is false when a message after
// seq is no longer retained, or when seq is beyond the topic's last
// sequence (it belongs to another epoch); Since 0 is always complete.
func (h *History) Since(ctx context.Context, topic string, seq uint64, limit int) (fabric.Range, error) {
	b := h.b
	meta, stream, _ := h.keys(topic)
	args := []string{
		strconv.FormatUint(seq, 10),
		strconv.Itoa(max(limit, 0)),
		strconv.FormatInt(ageMS(b.opts.MaxAge), 10),
		b.newEpoch(),
		strconv.FormatInt(ms(b.opts.EmptyTopicTTL), 10),
	}
	var rng fabric.Range
	err := b.callIdempotent(ctx, fmt.Sprintf("history of %q after %d", clip(topic), seq), func(ctx context.Context) error {
		vs, err := sinceScript.run(ctx, b.client, []string{meta, stream}, args).ToArray()
		if err != nil {
			return err
		}
		if len(vs) < 4 || len(vs)%2 != 0 {
			return errors.New("since: malformed reply")
		}
		if rng.Epoch, err = vs[0].ToString(); err != nil {
			return err
		}
		complete, _ := vs[2].AsInt64()
		more, _ := vs[3].AsInt64()
		rng.Complete, rng.More = complete == 1, more == 1
		msgs := vs[4:]
		rng.Messages = make([]fabric.Stored, 0, len(msgs)/2)
		for i := 0; i < len(msgs); i += 2 {
			s, err := msgs[i].AsInt64()
			if err != nil {
				return err
			}
			env, err := msgs[i+1].ToString()
			if err != nil {
				return err
			}
			rng.Messages = append(rng.Messages, fabric.Stored{Seq: uint64(s), Envelope: []byte(env)})
		}
		return nil
	})
	if err != nil {
		return fabric.Range{}, err
	}
	h.epochs().put(topic, rng.Epoch)
	return rng, nil
}

// Last implements fabric.History: the last sequence assigned in the
// current epoch, whether or not that message is still retained (Seq 0:
// none yet).
func (h *History) Last(ctx context.Context, topic string) (fabric.Position, error) {
	epoch, last, err := h.meta(ctx, topic)
	if err != nil {
		return fabric.Position{}, err
	}
	return fabric.Position{Seq: last, Epoch: epoch}, nil
}

// Epoch implements fabric.History. A topic without history gets its
// incarnation (and so the epoch its first message will have) at the first
// Epoch, Last or Since; the incarnation is kept EmptyTopicTTL unless a
// message arrives. The epoch is cached and read again at most once a
// second per topic (Append, Since and Last refresh it too); while Redis
// cannot answer, the cached one answers for up to epochGrace.
func (h *History) Epoch(ctx context.Context, topic string) (string, error) {
	c := h.epochs()
	e, at, ok := c.get(topic)
	if ok && time.Since(at) < time.Second {
		return e, nil
	}
	epoch, _, err := h.meta(ctx, topic)
	if err != nil {
		if ok && time.Since(at) < epochGrace && errors.Is(err, fabric.ErrBackendUnavailable) {
			return e, nil
		}
		return "", err
	}
	return epoch, nil
}

// epochGrace is how long a cached epoch still answers while Redis cannot
// be asked.
const epochGrace = 10 * time.Second

func (h *History) meta(ctx context.Context, topic string) (epoch string, last uint64, err error) {
	b := h.b
	meta, stream, _ := h.keys(topic)
	args := []string{b.newEpoch(), strconv.FormatInt(ms(b.opts.EmptyTopicTTL), 10)}
	err = b.callIdempotent(ctx, "epoch of "+strconv.Quote(clip(topic)), func(ctx context.Context) error {
		vs, err := metaScript.run(ctx, b.client, []string{meta, stream}, args).ToArray()
		if err != nil {
			return err
		}
		if len(vs) != 2 {
			return errors.New("meta: malformed reply")
		}
		if epoch, err = vs[0].ToString(); err != nil {
			return err
		}
		n, err := vs[1].AsInt64()
		last = uint64(n)
		return err
	})
	if err != nil {
		return "", 0, err
	}
	h.epochs().put(topic, epoch)
	return epoch, last, nil
}

func (h *History) epochs() *epochCache {
	h.cacheOnce.Do(func() { h.cache = newEpochCache(epochCacheSize) })
	return h.cache
}

// epochCacheSize bounds the topics whose epoch is cached.
const epochCacheSize = 65536

// epochCache remembers recent epochs, bounded: a full shard forgets an
// arbitrary entry to make room.
type epochCache struct {
	seed   maphash.Seed
	per    int
	shards [16]struct {
		mu sync.Mutex
		m  map[string]epochEntry
	}
}

type epochEntry struct {
	epoch string
	at    time.Time
}

func newEpochCache(size int) *epochCache {
	c := &epochCache{seed: maphash.MakeSeed(), per: max(size/16, 1)}
	for i := range c.shards {
		c.shards[i].m = map[string]epochEntry{}
	}
	return c
}

func (c *epochCache) shard(topic string) int { return int(maphash.String(c.seed, topic) % 16) }

func (c *epochCache) get(topic string) (string, time.Time, bool) {
	s := &c.shards[c.shard(topic)]
	s.mu.Lock()
	e, ok := s.m[topic]
	s.mu.Unlock()
	return e.epoch, e.at, ok
}

func (c *epochCache) put(topic, epoch string) {
	s := &c.shards[c.shard(topic)]
	s.mu.Lock()
	if _, ok := s.m[topic]; !ok && len(s.m) >= c.per {
		for k := range s.m {
			delete(s.m, k)
			break
		}
	}
	s.m[topic] = epochEntry{epoch: epoch, at: time.Now()}
	s.mu.Unlock()
}

var _ fabric.History = (*History)(nil)
