// The client's small parts: token expiry, the SSE parser, the store.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tokenExpiry, SSEParser, writable, FabricError, RpcError } from '../fabric.js';
import { jwt } from './helpers.mjs';

test('tokenExpiry reads a JWT exp without verifying, tolerates opaque tokens', () => {
  assert.equal(tokenExpiry(jwt({ sub: 'alice', exp: 1893456000 })), 1893456000);
  // base64url characters (- and _) in the payload
  assert.equal(tokenExpiry(jwt({ sub: '>>>???', n: 'ÿÿÿ', exp: 42 })), 42);
  assert.equal(tokenExpiry(jwt({ sub: 'alice' })), undefined, 'no exp');
  assert.equal(tokenExpiry(jwt({ exp: '42' })), undefined, 'exp not a number');
  assert.equal(tokenExpiry('opaque-session-token'), undefined);
  assert.equal(tokenExpiry('a.b.c'), undefined, 'not base64 JSON');
  assert.equal(tokenExpiry(undefined), undefined);
});

test('SSEParser: events split anywhere, CRLF, comments, multi-line data, ids', () => {
  const got = [];
  const p = new SSEParser((e) => got.push(e));
  const stream =
    'retry: 1000\r\nevent: session\r\ndata: {"session":"s1"}\r\n\r\n' +
    ': ping\n\n' +
    'id: chat%3A1=42%3Aep\nevent: created\ndata: {"a":\ndata: 1}\n\n' +
    'data:no space\n\n' +
    'event: x\n\n'; // no data: no event
  for (let i = 0; i < stream.length; i += 3) p.push(stream.slice(i, i + 3));
  assert.deepEqual(got, [
    { event: 'session', data: '{"session":"s1"}', id: null },
    { event: 'created', data: '{"a":\n1}', id: 'chat%3A1=42%3Aep' },
    { event: 'message', data: 'no space', id: 'chat%3A1=42%3Aep' },
  ]);
  // A CR at the very end of a chunk waits for a possible LF.
  const q = [];
  const p2 = new SSEParser((e) => q.push(e.data));
  p2.push('data: a\r');
  p2.push('\n\r');
  p2.push('\n');
  assert.deepEqual(q, ['a']);
});

test('writable follows the Svelte store contract', () => {
  let started = 0;
  let stopped = 0;
  const s = writable(1, () => {
    started++;
    return () => stopped++;
  });
  const seen = [];
  const off = s.subscribe((v) => seen.push(v));
  assert.deepEqual(seen, [1], 'called at once with the value');
  s.set(2);
  s.update((v) => v + 1);
  assert.deepEqual(seen, [1, 2, 3]);
  const off2 = s.subscribe(() => {});
  assert.equal(started, 1);
  off();
  assert.equal(stopped, 0);
  off2();
  assert.equal(stopped, 1, 'stops with the last subscriber');
  off2(); // twice is harmless
  assert.equal(stopped, 1);
});

test('FabricError carries the code and details; RpcError is the same class', () => {
  const e = new FabricError('VALIDATION', 'text is required', { issues: [{ path: ['text'] }] });
  assert.ok(e instanceof Error);
  assert.equal(e.code, 'VALIDATION');
  assert.deepEqual(e.issues, [{ path: ['text'] }]);
  assert.equal(RpcError, FabricError);
});
