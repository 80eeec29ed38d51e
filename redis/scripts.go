package redis

import (
	"crypto/sha1"
	"encoding/hex"
)

// The Lua scripts. Each runs atomically on the keys of one partition (one
// hash slot on a cluster) and costs one round trip. Times come from the
// server's clock (TIME), so that every instance agrees on windows, expiries
// and ages. Scripts use no shebang, so that Redis 6.2 and 7, Valkey and
// KeyDB all run them; sequences stay far below 2^53, where Lua numbers are
// exact.

func shaOf(src string) string {
	sum := sha1.Sum([]byte(src))
	return hex.EncodeToString(sum[:])
}

// luaNow is the server's time in milliseconds.
const luaNow = `
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
`

// luaHistory holds the helpers of the history scripts.
//
// ensure(meta, stream, candidate, ttl) returns the topic's epoch and last
// sequence, creating the topic's incarnation (epoch = candidate, sequence
// 0, expiring after ttl ms unless appended to) when it has none. A new
// incarnation drops whatever stream a lost meta key left behind, so its
// sequences start again at 1 in a fresh stream.
//
// trim(stream, cutoff) removes the entries appended before cutoff (ms):
// they are the oldest, as entries are appended in time order.
const luaHistory = luaNow + `
local function ensure(meta, stream, candidate, ttl)
  local v = redis.call('HMGET', meta, 'e', 's')
  if v[1] then return v[1], tonumber(v[2]) end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', candidate, 's', 0)
  redis.call('PEXPIRE', meta, ttl)
  return candidate, 0
end

local function seqof(id)
  return tonumber(string.match(id, '^(%d+)'))
end

local function trim(stream, cutoff)
  while true do
    local r = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #r == 0 or tonumber(r[1][2][2]) >= cutoff then return end
    -- The oldest has expired: look at a batch, remove what expired.
    r = redis.call('XRANGE', stream, '-', '+', 'COUNT', 128)
    local keep = nil
    for i = 1, #r do
      if tonumber(r[i][2][2]) >= cutoff then keep = r[i][1]; break end
    end
    if keep then
      redis.call('XTRIM', stream, 'MINID', keep)
      return
    end
    redis.call('XTRIM', stream, 'MINID', string.format('%d-0', seqof(r[#r][1]) + 1))
  end
end
`

// appendScript stores an envelope as its topic's next message and
// publishes it, atomically.
//
// KEYS: meta, stream, [dedupe]. ARGV: channel, envelope, max per topic,
// max age ms (0: none), epoch candidate, empty-topic ttl ms, sharded ('1':
// SPUBLISH), dedupe window ms.
//
// It assigns seq = last + 1 (HINCRBY), XADDs the envelope with id
// "<seq>-0" and its time, trims the stream to the per-topic cap (and the
// age), and publishes "\x01<seq>:<seq-1>:" + envelope on the topic's
// channel: subscribers get every stored message, in sequence order, with
// its predecessor's sequence. With a dedupe key (an idempotent append) a
// message id seen within the window returns the position it got then and
// stores nothing.
//
// Returns {seq, epoch, duplicate (0/1)}.
var appendScript = newScript(luaHistory + `
local meta, stream, dedupe = KEYS[1], KEYS[2], KEYS[3]
local age = tonumber(ARGV[4])
local e, last = ensure(meta, stream, ARGV[5], ARGV[6])
if dedupe then
  local d = redis.call('GET', dedupe)
  if d then
    local sep = string.find(d, ':', 1, true)
    if sep and string.sub(d, sep + 1) == e then
      return {tonumber(string.sub(d, 1, sep - 1)), e, 1}
    end
  end
end
local seq = redis.call('HINCRBY', meta, 's', 1)
local now = now_ms()
redis.call('XADD', stream, 'MAXLEN', ARGV[3], string.format('%d-0', seq), 't', now, 'd', ARGV[2])
if age > 0 then
  trim(stream, now - age)
  redis.call('PEXPIRE', meta, age)
  redis.call('PEXPIRE', stream, age)
else
  redis.call('PERSIST', meta)
end
local payload = string.format('\1%d:%d:', seq, seq - 1) .. ARGV[2]
if ARGV[7] == '1' then
  redis.call('SPUBLISH', ARGV[1], payload)
else
  redis.call('PUBLISH', ARGV[1], payload)
end
if dedupe then
  redis.call('SET', dedupe, string.format('%d:', seq) .. e, 'PX', ARGV[8])
end
return {seq, e, 0}
`)

// sinceScript reads a topic's retained messages after a sequence.
//
// KEYS: meta, stream. ARGV: seq, limit (0: all), max age ms (0: none),
// epoch candidate, empty-topic ttl ms.
//
// The retained messages are always a contiguous run first..last (trimming
// takes the oldest), so a message after seq was lost exactly when seq+1 <
// first (or nothing is retained and seq < last); a seq beyond last belongs
// to another incarnation.
//
// Returns {epoch, last, complete (0/1), more (0/1), seq1, envelope1, ...}.
var sinceScript = newScript(luaHistory + `
local meta, stream = KEYS[1], KEYS[2]
local seq, limit, age = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local e, last = ensure(meta, stream, ARGV[4], ARGV[5])
if age > 0 then trim(stream, now_ms() - age) end
local out = {e, last, 1, 0}
if seq > last then
  out[3] = 0
  return out
end
if seq == last then return out end
if seq > 0 then
  local f = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #f == 0 or seqof(f[1][1]) > seq + 1 then out[3] = 0 end
end
local r
if limit > 0 then
  r = redis.call('XRANGE', stream, string.format('%d-0', seq + 1), '+', 'COUNT', limit + 1)
  if #r > limit then
    out[4] = 1
    r[#r] = nil
  end
else
  r = redis.call('XRANGE', stream, string.format('%d-0', seq + 1), '+')
end
for i = 1, #r do
  out[#out + 1] = seqof(r[i][1])
  out[#out + 1] = r[i][2][4]
end
return out
`)

// metaScript returns a topic's epoch and last sequence (creating its
// incarnation, see ensure). KEYS: meta, stream. ARGV: epoch candidate,
// empty-topic ttl ms. Returns {epoch, last}.
var metaScript = newScript(luaHistory + `
local e, last = ensure(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {e, last}
`)

// luaPresence holds the helpers of the presence scripts: bump(ver,
// candidate) takes a partition's next version, creating the partition's
// incarnation (a random id, candidate) when it has none, and returns both.
// A watcher that sees another incarnation (the keys were deleted, Redis
// restarted empty) reloads everything.
const luaPresence = luaNow + `
local function bump(ver, candidate)
  local inc = redis.call('HGET', ver, 'i')
  if not inc then
    inc = candidate
    redis.call('HSET', ver, 'i', inc)
  end
  return inc, redis.call('HINCRBY', ver, 'v', 1)
end

local function publish(channel, sharded, payload)
  if sharded == '1' then
    redis.call('SPUBLISH', channel, payload)
  else
    redis.call('PUBLISH', channel, payload)
  end
end
`

// presenceScript writes one presence entry of a partition and publishes
// the change.
//
// KEYS: expiry zset, entry hash, version hash {i, v}. ARGV: op ('put' or
// 'del'), entry id, value (put), ttl ms (put), change channel, sharded,
// incarnation candidate.
//
// A put sets the entry's expiry to now + ttl; when its value is new or
// changed it also stores it, takes the partition's next version and
// publishes "P<incarnation>:<version>:<value>". A del of an existing entry
// removes it, takes the next version and publishes
// "R<incarnation>:<version>:<id>". Every change published on a partition's
// channel has the previous one's version plus one, in the order the
// changes took effect, so a watcher can tell when it missed one. Returns
// {incarnation, version after the write} (the current ones when nothing was
// published; "" and 0 for a partition that never had a change).
var presenceScript = newScript(luaPresence + `
local zset, hash, ver = KEYS[1], KEYS[2], KEYS[3]
local op, id = ARGV[1], ARGV[2]
if op == 'put' then
  redis.call('ZADD', zset, now_ms() + tonumber(ARGV[4]), id)
  if redis.call('HGET', hash, id) ~= ARGV[3] then
    redis.call('HSET', hash, id, ARGV[3])
    local inc, v = bump(ver, ARGV[7])
    publish(ARGV[5], ARGV[6], string.format('P%s:%d:', inc, v) .. ARGV[3])
    return {inc, v}
  end
elseif redis.call('HDEL', hash, id) == 1 then
  redis.call('ZREM', zset, id)
  local inc, v = bump(ver, ARGV[7])
  publish(ARGV[5], ARGV[6], string.format('R%s:%d:', inc, v) .. id)
  return {inc, v}
end
local cur = redis.call('HMGET', ver, 'i', 'v')
return {cur[1] or '', tonumber(cur[2] or '0')}
`)

// sweepScript removes the expired entries of a partition, publishing each
// removal as presenceScript's del does. KEYS: expiry zset, entry hash,
// version hash. ARGV: change channel, sharded, most entries to remove,
// incarnation candidate. Returns how many it removed.
var sweepScript = newScript(luaPresence + `
local zset, hash, ver = KEYS[1], KEYS[2], KEYS[3]
local ids = redis.call('ZRANGEBYSCORE', zset, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #ids do
  local id = ids[i]
  redis.call('ZREM', zset, id)
  if redis.call('HDEL', hash, id) == 1 then
    local inc, v = bump(ver, ARGV[4])
    publish(ARGV[1], ARGV[2], string.format('R%s:%d:', inc, v) .. id)
  end
end
return #ids
`)

// snapshotScript returns a partition's live entries and the incarnation
// and version they are at: {incarnation, version, value1, value2, ...}.
// Entries whose expiry has passed (the next sweep removes them and
// publishes it) are left out. KEYS: expiry zset, entry hash, version hash.
var snapshotScript = newScript(luaNow + `
local zset, hash, ver = KEYS[1], KEYS[2], KEYS[3]
local cur = redis.call('HMGET', ver, 'i', 'v')
local out = {cur[1] or '', tonumber(cur[2] or '0')}
local ids = redis.call('ZRANGEBYSCORE', zset, '(' .. now_ms(), '+inf')
for i = 1, #ids do
  local v = redis.call('HGET', hash, ids[i])
  if v then out[#out + 1] = v end
end
return out
`)

// consumeScript is one rate-limit decision: a fixed window per key,
// shifted by the key's offset, and bans.
//
// KEYS: counter hash {w, u}, ban key. ARGV: cost, points, interval ms,
// offset ms, block ms (0: none).
//
// A banned key is refused with the ban's remaining time. Otherwise the
// window is floor((now - offset) / interval); the count restarts in a new
// window; cost is admitted when it fits in what is left (the counter then
// expires at the window's end). A refusal of a key whose tokens ran out
// bans it for block ms when block > 0.
//
// Returns {allowed (0/1), remaining, reset after ms}.
var consumeScript = newScript(luaNow + `
local counter, ban = KEYS[1], KEYS[2]
local cost, points = tonumber(ARGV[1]), tonumber(ARGV[2])
local iv, off, block = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local b = redis.call('PTTL', ban)
if b > 0 then return {0, 0, b} end
local w = math.floor((now - off) / iv)
local wend = (w + 1) * iv + off
local cur = redis.call('HMGET', counter, 'w', 'u')
local used = 0
if cur[1] and tonumber(cur[1]) == w then used = tonumber(cur[2]) end
if cost <= points - used then
  used = used + cost
  redis.call('HSET', counter, 'w', string.format('%d', w), 'u', used)
  redis.call('PEXPIREAT', counter, string.format('%d', wend))
  return {1, points - used, wend - now}
end
if cost <= points and block > 0 then
  redis.call('SET', ban, '1', 'PX', block)
  return {0, 0, block}
end
return {0, points - used, wend - now}
`)

// acquireScript takes or refreshes a lease. KEYS: lease. ARGV: holder, ttl
// ms. Returns 1 when holder has the lease now, 0 when another does.
var acquireScript = newScript(`
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
`)

// releaseScript gives a lease up if holder has it. KEYS: lease. ARGV:
// holder. Returns 1 when it was released.
var releaseScript = newScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`)
