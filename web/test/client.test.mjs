// The client over a scripted WebSocket: subscriptions, resume, close
// codes, RPC, presence, tokens.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, FabricError } from '../fabric.js';
import { fakeWebSocket, waitFor, tick, jwt } from './helpers.mjs';

const URL_WS = 'ws://fabric.test/ws';

function setup(opts = {}) {
  const WS = fakeWebSocket();
  const client = connect({
    url: URL_WS,
    WebSocket: WS,
    sse: 'never',
    storage: null,
    watchNetwork: false,
    random: () => 0.5,
    linger: 5,
    reconnect: { base: 10, cap: 40, goingAwaySpread: 30, stableAfter: 60000 },
    ...opts,
  });
  return { WS, client };
}

/** Opens the newest socket and returns it. */
async function opened(WS, n) {
  await waitFor(() => WS.instances.length >= n, `socket #${n}`);
  const ws = WS.instances[n - 1];
  ws.open();
  return ws;
}

const subs = (ws) => ws.sent.filter((f) => f.type === 'subscribe');

test('subscribe: acknowledged by ref, the store holds the last message or the last keep', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  assert.equal(client.status.get(), 'open');
  assert.equal(client.transport, 'websocket');
  const chat = client.topic('chat', { keep: 2 });
  const values = [];
  const off = chat.subscribe((v) => values.push(v.map((m) => m.data)));
  const [f] = subs(ws);
  assert.deepEqual(Object.keys(f).sort(), ['ref', 'topic', 'type']);
  assert.equal(f.topic, 'chat');
  const ready = chat.ready();
  ws.recv({ type: 'subscribed', topic: 'chat', ref: f.ref });
  await ready;
  assert.ok(chat.subscribed);
  for (const n of [1, 2, 3]) ws.recv({ topic: 'chat', event: 'm', data: n });
  assert.deepEqual(values, [[], [1], [1, 2], [2, 3]]);
  const last = client.topic('feed');
  const got = [];
  const offFeed = last.on('created', (m) => got.push(m.data));
  ws.recv({ topic: 'feed', event: 'deleted', data: 0 });
  ws.recv({ topic: 'feed', event: 'created', data: 1 });
  assert.deepEqual(got, [1]);
  assert.deepEqual(last.value, { topic: 'feed', event: 'created', data: 1 });
  off();
  offFeed();
  await waitFor(() => ws.sent.filter((f) => f.type === 'unsubscribe').length === 2, 'unsubscribes after linger');
});

test('resume: after a drop, every persistent topic resubscribes with since and epoch', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  const chat = client.topic('chat');
  const plain = client.topic('cursor');
  const got = [];
  chat.on((m) => got.push(m.seq));
  plain.on(() => {});
  ws1.recv({ topic: 'chat', event: 'm', data: 'a', seq: 5 });
  ws1.recv({ topic: 'chat', event: 'm', data: 'b', seq: 7 });
  ws1.recv({ topic: 'cursor', event: 'move', data: {} });
  ws1.drop(1006);
  assert.equal(client.status.get(), 'reconnecting');
  const ws2 = await opened(WS, 2);
  const byTopic = Object.fromEntries(subs(ws2).map((f) => [f.topic, f]));
  assert.equal(byTopic.chat.since, 7);
  assert.equal(byTopic.chat.epoch, undefined, 'no epoch known yet');
  assert.equal(byTopic.cursor.since, undefined, 'a topic without seq resubscribes plainly');
  const resumes = [];
  client.on('resume', (r) => resumes.push(r));
  ws2.recv({ topic: 'chat', event: 'm', data: 'c', seq: 9 });
  ws2.recv({ topic: '__replay:chat', event: 'end', data: { seq: 9, epoch: 'E1', recovered: true } });
  ws2.recv({ type: 'subscribed', topic: 'chat', ref: byTopic.chat.ref });
  assert.deepEqual(resumes, [{ topic: 'chat', recovered: true, seq: 9, epoch: 'E1', replayed: 1 }]);
  ws2.recv({ topic: 'chat', event: 'm', data: 'd', seq: 11 });
  ws2.drop(1000);
  const ws3 = await opened(WS, 3);
  const f = subs(ws3).find((x) => x.topic === 'chat');
  assert.equal(f.since, 11);
  assert.equal(f.epoch, 'E1');
  assert.deepEqual(got, [5, 7, 9, 11]);
});

test('resume: recovered:false is told as "reload"; a new epoch resets the position', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  const chat = client.topic('chat');
  const reloads = [];
  client.on('reload', (r) => reloads.push(r));
  const topicResumes = [];
  chat.onResume((r) => topicResumes.push(r.recovered));
  chat.on(() => {});
  ws1.recv({ topic: 'chat', event: 'm', data: 1, seq: 500 });
  ws1.drop();
  const ws2 = await opened(WS, 2);
  assert.equal(subs(ws2)[0].since, 500);
  // The stream was recreated: everything retained (low seqs), then end.
  ws2.recv({ topic: 'chat', event: 'm', data: 2, seq: 3 });
  ws2.recv({ topic: 'chat', event: 'm', data: 3, seq: 4 });
  ws2.recv({ topic: '__replay:chat', event: 'end', data: { seq: 4, epoch: 'E2', recovered: false } });
  assert.equal(reloads.length, 1);
  assert.deepEqual(reloads[0], { topic: 'chat', recovered: false, seq: 4, epoch: 'E2', replayed: 2 });
  assert.deepEqual(topicResumes, [false]);
  assert.equal(chat.seq, 4);
  ws2.recv({ topic: 'chat', event: 'm', data: 4, seq: 6 });
  assert.equal(chat.seq, 6);
});

test('live duplicates (the same seq twice) are dropped', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  const got = [];
  client.subscribe('chat', (m) => got.push(m.seq));
  for (const s of [1, 2, 2, 3, 1]) ws.recv({ topic: 'chat', event: 'm', data: null, seq: s });
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(client.duplicates, 2);
});

test('history: true asks for the retained messages on the first subscribe; since starts elsewhere', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  client.topic('chat', { history: true }).on(() => {});
  client.topic('log', { since: 42, epoch: 'E' }).on(() => {});
  const byTopic = Object.fromEntries(subs(ws).map((f) => [f.topic, f]));
  assert.equal(byTopic.chat.since, 0);
  assert.equal(byTopic.log.since, 42);
  assert.equal(byTopic.log.epoch, 'E');
});

test('a persistent topic that saw no message resumes from 0 after a drop', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  client.topic('orders', { persistent: true }).on(() => {});
  assert.equal(subs(ws1)[0].since, undefined, 'the first subscribe is live only');
  ws1.drop();
  const ws2 = await opened(WS, 2);
  assert.equal(subs(ws2)[0].since, 0);
});

test('subscribe denied: ready() rejects, "denied" is emitted, no resubscribe; RATE_LIMITED is retried', async (t) => {
  const { WS, client } = setup({ random: () => 0 });
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  const denied = [];
  client.on('denied', (d) => denied.push(d));
  const secret = client.topic('secret');
  secret.on(() => {});
  const f = subs(ws)[0];
  ws.recv({ type: 'subscribe-denied', topic: 'secret', ref: f.ref, reason: 'FORBIDDEN' });
  await assert.rejects(secret.ready(), (e) => e instanceof FabricError && e.code === 'FORBIDDEN');
  assert.deepEqual(denied, [{ topic: 'secret', reason: 'FORBIDDEN' }]);
  const busy = client.topic('busy', { since: 3 });
  busy.on(() => {});
  const b = subs(ws).find((x) => x.topic === 'busy');
  ws.recv({ type: 'subscribe-denied', topic: 'busy', ref: b.ref, reason: 'RATE_LIMITED' });
  await waitFor(() => subs(ws).filter((x) => x.topic === 'busy').length === 2, 'the retry', 3000);
  assert.equal(subs(ws).filter((x) => x.topic === 'busy')[1].since, 3, 'same position');
});

test('close codes: 1001 spreads, 4403 stops with an error, 1008 stops, reconnect() resumes', async (t) => {
  const { WS, client } = setup({ random: () => 0.999 });
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  const closes = [];
  client.on('close', (c) => closes.push(c));
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  ws1.drop(1001, 'server shutting down');
  assert.equal(closes[0].delay, 29, "0.999 of goingAwaySpread (30 ms)");
  const ws2 = await opened(WS, 2);
  ws2.drop(4403, 'forbidden');
  assert.equal(client.status.get(), 'error');
  assert.equal(client.state.get().error.code, 'FORBIDDEN');
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(WS.instances.length, 2, 'no reconnect after 4403');
  client.reconnect();
  const ws3 = await opened(WS, 3);
  ws3.drop(1008, 'policy');
  assert.equal(client.status.get(), 'closed');
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(WS.instances.length, 3, 'no reconnect after 1008');
  assert.deepEqual(errors, ['FORBIDDEN', 'POLICY']);
  client.reconnect();
  await opened(WS, 4);
  assert.equal(client.status.get(), 'open');
});

test('backoff: failed attempts wait longer and longer, up to the cap; an open resets nothing until stable', async (t) => {
  const { WS, client } = setup({ random: () => 0.999 });
  t.after(() => client.close());
  const delays = [];
  client.on('close', (c) => c.reconnect && delays.push(c.delay));
  const ws1 = await opened(WS, 1);
  ws1.drop(1006);
  for (let n = 2; n <= 5; n++) {
    await waitFor(() => WS.instances.length >= n, 'attempt ' + n);
    WS.instances[n - 1].fail();
  }
  assert.deepEqual(delays, [9, 19, 39, 39, 39], 'base 10, doubling, cap 40');
});

test('4401: getToken is called again and the new token goes in the URL; without getToken the client stops', async (t) => {
  let n = 0;
  const { WS, client } = setup({ getToken: async () => 'tok' + ++n });
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  assert.equal(new URL(ws1.url).searchParams.get('token'), 'tok1');
  ws1.drop(4401, 'token expired');
  const ws2 = await opened(WS, 2);
  assert.equal(new URL(ws2.url).searchParams.get('token'), 'tok2');
  assert.equal(client.status.get(), 'open');

  const other = setup({ token: 'fixed', params: { name: 'Ann' } });
  t.after(() => other.client.close());
  const o1 = await opened(other.WS, 1);
  const u = new URL(o1.url);
  assert.equal(u.searchParams.get('token'), 'fixed');
  assert.equal(u.searchParams.get('name'), 'Ann');
  other.client.on('error', () => {});
  o1.drop(4401);
  assert.equal(other.client.status.get(), 'error');
  assert.equal(other.client.state.get().error.code, 'TOKEN_EXPIRED');
});

test('a failing getToken backs off like any reconnect', async (t) => {
  let calls = 0;
  const { WS, client } = setup({
    getToken: async () => {
      if (++calls < 3) throw new Error('auth server down');
      return 'ok';
    },
  });
  t.after(() => client.close());
  client.on('error', () => {});
  const delays = [];
  client.on('close', (c) => delays.push(c.delay));
  const ws = await opened(WS, 1);
  assert.equal(calls, 3);
  assert.deepEqual(delays, [5, 10], 'backed off: 0.5 × 10, 0.5 × 20');
  assert.equal(new URL(ws.url).searchParams.get('token'), 'ok');
});

test('token refresh: on refresh-needed, and before exp; refreshed and refresh-denied', async (t) => {
  let n = 0;
  const exp = Math.floor(Date.now() / 1000) + 2;
  const { WS, client } = setup({ getToken: async () => jwt({ sub: 'a', n: ++n, exp }), refreshBefore: 1000 });
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  const refreshes = () => ws.sent.filter((f) => f.type === 'refresh');
  const events = [];
  client.on('refreshed', (e) => events.push(e));
  ws.recv({ type: 'refresh-needed', exp });
  const r1 = await waitFor(() => refreshes()[0], 'a refresh frame');
  assert.equal(tokenN(r1.token), 2);
  ws.recv({ type: 'refreshed', ref: r1.ref, exp: exp + 3600 });
  await waitFor(() => events.length === 1, 'refreshed');
  assert.deepEqual(events, [{ exp: exp + 3600 }]);
  // A denial is an error, and no loop.
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  const p = client.refreshToken();
  const r2 = await waitFor(() => refreshes()[1], 'a second refresh frame');
  ws.recv({ type: 'refresh-denied', ref: r2.ref, reason: 'UNAUTHENTICATED' });
  await assert.rejects(p, (e) => e.code === 'UNAUTHENTICATED');
  assert.deepEqual(errors, ['UNAUTHENTICATED']);
  await tick();
  assert.equal(refreshes().length, 2);

  // Scheduled from the JWT's exp: ~1 s before it (refreshBefore 1000 ms).
  const exp2 = Math.floor(Date.now() / 1000) + 3;
  let m = 0;
  const s = setup({ getToken: async () => jwt({ m: ++m, exp: exp2 }), refreshBefore: 1000 });
  t.after(() => s.client.close());
  const ws2 = await opened(s.WS, 1);
  const r = await waitFor(() => ws2.sent.find((f) => f.type === 'refresh'), 'a scheduled refresh', 4000);
  assert.ok(Date.now() >= exp2 * 1000 - 1100, 'not before ~exp - refreshBefore');
  assert.ok(r.token);
});

function tokenN(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString()).n;
}

test('rpc: results, errors with codes, timeouts', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  const p1 = client.rpc('chat/add', 2, 3);
  const f1 = ws.sent.find((f) => f.rpc === 'chat/add');
  assert.deepEqual(f1.args, [2, 3]);
  assert.equal(typeof f1.id, 'string');
  ws.recv({ topic: '__rpc', event: f1.id, data: { id: f1.id, ok: true, data: 5 } });
  assert.equal(await p1, 5);
  const p2 = client.call('chat/validate', [{}]);
  const f2 = ws.sent.find((f) => f.rpc === 'chat/validate');
  ws.recv({ topic: '__rpc', event: f2.id, data: { id: f2.id, ok: false, code: 'VALIDATION', error: 'text is required', issues: [{ path: ['text'] }] } });
  await assert.rejects(p2, (e) => e instanceof FabricError && e.code === 'VALIDATION' && e.message === 'text is required' && e.issues[0].path[0] === 'text');
  const p3 = client.call('slow', [], { timeout: 20 });
  await assert.rejects(p3, (e) => e.code === 'TIMEOUT');
  const p4 = client.publish('chat', 'message', { text: 'hi' });
  const f4 = ws.sent.find((f) => f.rpc === 'fabric/publish');
  assert.deepEqual(f4.args, ['chat', 'message', { text: 'hi' }]);
  ws.recv({ topic: '__rpc', event: f4.id, data: { id: f4.id, ok: true, data: { seq: 12 } } });
  assert.deepEqual(await p4, { seq: 12 });
});

test('rpc offline: queued calls go after the resubscriptions; in-flight calls fail DISCONNECTED; queue bound; fail mode', async (t) => {
  const { WS, client } = setup({ maxQueue: 2 });
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  client.topic('chat').on(() => {});
  const inflight = client.rpc('a/b');
  ws1.drop();
  await assert.rejects(inflight, (e) => e.code === 'DISCONNECTED');
  const q1 = client.rpc('q/one');
  const q2 = client.rpc('q/two');
  const q3 = client.rpc('q/three'); // the queue holds 2: q1 is dropped
  await assert.rejects(q1, (e) => e.code === 'QUEUE_FULL');
  await assert.rejects(client.call('x/y', [], { offline: 'fail' }), (e) => e.code === 'DISCONNECTED');
  const ws2 = await opened(WS, 2);
  const kinds = ws2.sent.map((f) => f.type || f.rpc);
  assert.deepEqual(kinds, ['subscribe', 'q/two', 'q/three']);
  for (const f of ws2.sent.slice(1)) ws2.recv({ topic: '__rpc', event: f.id, data: { id: f.id, ok: true, data: f.rpc } });
  assert.equal(await q2, 'q/two');
  assert.equal(await q3, 'q/three');
  client.close();
  await assert.rejects(client.rpc('after/close'), (e) => e.code === 'CONNECTION_CLOSED');
});

test('rpc batch answers resolve each call', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws = await opened(WS, 1);
  const a = client.rpc('x/a');
  const b = client.rpc('x/b');
  const [fa, fb] = ws.sent;
  ws.recv({ topic: '__rpc', event: '__batch', data: { batch: [{ id: fa.id, ok: true, data: 1 }, { id: fb.id, ok: false, code: 'NOT_FOUND', error: 'Not found' }] } });
  assert.equal(await a, 1);
  await assert.rejects(b, (e) => e.code === 'NOT_FOUND');
});

test('presence: list, join, leave, heartbeat; join() subscribes the topic; a new list after a reconnect', async (t) => {
  const { WS, client } = setup();
  t.after(() => client.close());
  const ws1 = await opened(WS, 1);
  const room = client.presence('room');
  const seen = [];
  room.subscribe((list) => seen.push(list.map((m) => m.key).sort().join(',')));
  const joins = [];
  room.on('join', (m) => joins.push(m));
  assert.equal(subs(ws1)[0].topic, '__presence:room');
  const leave = room.join();
  assert.equal(subs(ws1)[1].topic, 'room');
  const P = '__presence:room';
  ws1.recv({ topic: P, event: 'list', data: [{ key: 'alice', data: { name: 'Alice' } }] });
  ws1.recv({ topic: P, event: 'join', data: { key: 'bob', data: null } });
  ws1.recv({ topic: P, event: 'join', data: { key: 'carol', data: null } });
  ws1.recv({ topic: P, event: 'leave', data: { key: 'alice', data: { name: 'Alice' } } });
  ws1.recv({ topic: P, event: 'heartbeat', data: ['bob'] });
  assert.deepEqual(seen, ['', 'alice', 'alice,bob', 'alice,bob,carol', 'bob,carol', 'bob']);
  assert.deepEqual(joins, [{ key: 'bob', data: null }, { key: 'carol', data: null }]);
  assert.equal(room.count, 1);
  ws1.drop();
  const ws2 = await opened(WS, 2);
  assert.deepEqual(subs(ws2).map((f) => f.topic).sort(), ['__presence:room', 'room']);
  ws2.recv({ topic: P, event: 'list', data: [{ key: 'dave', data: 1 }] });
  assert.deepEqual(room.members, [{ key: 'dave', data: 1 }]);
  leave();
  await waitFor(() => ws2.sent.some((f) => f.type === 'unsubscribe' && f.topic === 'room'), 'leave unsubscribes');
});

test('the status store and events follow the connection', async (t) => {
  const { WS, client } = setup();
  const statuses = [];
  client.status.subscribe((s) => statuses.push(s));
  const opens = [];
  client.on('open', (e) => opens.push(e));
  const ws1 = await opened(WS, 1);
  ws1.drop();
  await opened(WS, 2);
  client.close();
  assert.deepEqual(statuses, ['connecting', 'open', 'reconnecting', 'open', 'closed']);
  assert.deepEqual(opens, [
    { transport: 'websocket', reconnected: false },
    { transport: 'websocket', reconnected: true },
  ]);
  assert.equal(WS.instances[1].closedWith.code, 1000);
});

test('offline and online events: the connection is closed at once and reopened when the network is back', async (t) => {
  const et = new EventTarget();
  const saved = { add: globalThis.addEventListener, remove: globalThis.removeEventListener };
  globalThis.addEventListener = et.addEventListener.bind(et);
  globalThis.removeEventListener = et.removeEventListener.bind(et);
  t.after(() => {
    globalThis.addEventListener = saved.add;
    globalThis.removeEventListener = saved.remove;
  });
  const { WS, client } = setup({ watchNetwork: true });
  t.after(() => client.destroy());
  const ws1 = await opened(WS, 1);
  client.topic('chat').on(() => {});
  ws1.recv({ topic: 'chat', event: 'm', data: 1, seq: 3 });
  et.dispatchEvent(new Event('offline'));
  assert.equal(client.status.get(), 'offline');
  assert.equal(ws1.closedWith.code, 1000);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(WS.instances.length, 1, 'no attempts while offline');
  et.dispatchEvent(new Event('online'));
  const ws2 = await opened(WS, 2);
  assert.equal(subs(ws2)[0].since, 3);
});
