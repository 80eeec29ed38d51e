// Reconnect delays: full jitter, the cap, the 1001 spread, and the
// reconnect storm of 10,000 clients after a server restart, computed with
// the client's own delay function.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { reconnectDelay, RECONNECT_DEFAULTS } from '../fabric.js';

test('full jitter: uniform in [0, min(cap, base·2^n))', () => {
  const o = { base: 500, cap: 30000 };
  assert.equal(reconnectDelay(0, 1006, o, () => 0), 0);
  assert.equal(reconnectDelay(0, 1006, o, () => 0.999999), 499);
  assert.equal(reconnectDelay(1, 1006, o, () => 0.5), 500);
  assert.equal(reconnectDelay(3, 1006, o, () => 0.5), 2000);
  assert.equal(reconnectDelay(6, 1006, o, () => 0.5), 15000);
  assert.equal(reconnectDelay(7, 1006, o, () => 0.999999), 29999, 'capped at 30 s');
  assert.equal(reconnectDelay(500, 1006, o, () => 0.999999), 29999, 'no overflow');
});

test('1001: every retry window is at least goingAwaySpread, then backs off', () => {
  assert.equal(RECONNECT_DEFAULTS.goingAwaySpread, 5000);
  assert.equal(reconnectDelay(0, 1001, {}, () => 0.999999), 4999);
  assert.equal(reconnectDelay(0, 1001, {}, () => 0), 0);
  assert.equal(reconnectDelay(2, 1001, {}, () => 0.999999), 4999, 'retries while the server is down too');
  assert.equal(reconnectDelay(4, 1001, {}, () => 0.999999), 7999, 'then the exponential window takes over');
  assert.equal(reconnectDelay(9, 1001, {}, () => 0.999999), 29999, 'capped');
});

/** Counts delays (ms) into bins of width ms and draws them. */
function histogram(delays, width) {
  const bins = [];
  for (const d of delays) {
    const i = Math.floor(d / width);
    bins[i] = (bins[i] || 0) + 1;
  }
  for (let i = 0; i < bins.length; i++) bins[i] ||= 0;
  const max = Math.max(...bins);
  const lines = bins.map((n, i) => {
    const from = ((i * width) / 1000).toFixed(1).padStart(5);
    const to = (((i + 1) * width) / 1000).toFixed(1).padStart(5);
    return `${from}–${to} s ${String(n).padStart(6)} ${'#'.repeat(Math.round((n / max) * 40))}`;
  });
  return { bins, text: lines.join('\n') };
}

// A seeded generator, so the figures in docs/client.md are reproducible.
function mulberry32(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('reconnect storm: 10,000 clients closed with 1001 spread their first attempts over 5 s', (t) => {
  const random = mulberry32(17);
  const delays = Array.from({ length: 10000 }, () => reconnectDelay(0, 1001, {}, random));
  const { bins, text } = histogram(delays, 1000);
  t.diagnostic('first reconnect attempts of 10,000 clients after a 1001, per second:\n' + text);
  assert.equal(bins.length, 5, 'all within 5 s');
  for (const n of bins) assert.ok(n <= 2300, `no second holds more than 23% of them (got ${n})`);
  assert.ok(Math.min(...bins) >= 1700, 'every second gets its share');
  const half = histogram(delays, 500);
  t.diagnostic('per half second:\n' + half.text);
  assert.ok(Math.max(...half.bins) <= 1200, 'no half second holds more than 12%');
});

test('reconnect storm: a restart that takes 3 s, attempts retried with backoff until it is back', (t) => {
  // Each client got 1001 at t=0; the server refuses connections until
  // t=3 s; a refused attempt retries after reconnectDelay(attempt).
  const random = mulberry32(42);
  const down = 3000;
  const attempts = [];
  const connects = [];
  for (let c = 0; c < 10000; c++) {
    let at = 0;
    for (let n = 0; ; n++) {
      at += reconnectDelay(n, 1001, {}, random);
      attempts.push(at);
      if (at >= down) {
        connects.push(at);
        break;
      }
    }
  }
  const a = histogram(attempts, 1000);
  const c = histogram(connects, 1000);
  t.diagnostic(`all attempts (${attempts.length}), per second:\n` + a.text);
  t.diagnostic('successful connections once the server is back, per second:\n' + c.text);
  // Clients that tried while it was down retry within 5 s of their failure:
  // the reconnections come over 5 s, at most ~37% in the busiest second.
  assert.ok(Math.max(...a.bins) <= 4000, `no second gets more than 40% of the attempts (max ${Math.max(...a.bins)})`);
  assert.ok(Math.max(...c.bins) <= 4000, `no second gets more than 40% of the reconnections (max ${Math.max(...c.bins)})`);
  assert.ok(c.bins.filter((n) => n > 0).length >= 5, 'reconnections spread over 5 s or more');
  assert.ok(attempts.length < 20000, `the downtime costs fewer than 2 attempts per client (${attempts.length})`);
});

test('without the spread (a 1006 drop) the first attempts come within 500 ms', () => {
  const random = mulberry32(7);
  const delays = Array.from({ length: 10000 }, () => reconnectDelay(0, 1006, {}, random));
  assert.ok(Math.max(...delays) < 500);
});
