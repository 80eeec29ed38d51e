// The SSE transport: the fallback when a WebSocket cannot be opened, frames
// POSTed in order, resume identical to the WebSocket's, close events,
// HTTP refusals.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../fabric.js';
import { fakeWebSocket, fakeSSE, memoryStorage, waitFor } from './helpers.mjs';

function setup(opts = {}) {
  const WS = fakeWebSocket();
  const sse = fakeSSE(opts.sseServer);
  const storage = memoryStorage();
  const client = connect({
    url: 'ws://fabric.test/ws',
    WebSocket: WS,
    fetch: sse.fetch,
    storage,
    watchNetwork: false,
    random: () => 0.5,
    linger: 5,
    reconnect: { base: 10, cap: 40, goingAwaySpread: 30, stableAfter: 60000 },
    ...opts,
  });
  return { WS, sse, storage, client };
}

test('a WebSocket that cannot be opened falls back to SSE at once, and the choice is remembered', async (t) => {
  const { WS, sse, storage, client } = setup({ token: 'tok', params: { name: 'Ann' } });
  t.after(() => client.close());
  const chat = client.topic('chat', { history: true });
  const got = [];
  chat.on((m) => got.push(m.data));
  await waitFor(() => WS.instances.length === 1, 'a WebSocket attempt');
  WS.instances[0].fail(); // e.g. a proxy refusing the upgrade
  await waitFor(() => client.status.get() === 'open', 'open over SSE');
  assert.equal(client.transport, 'sse');
  const s = sse.streams[0];
  assert.equal(s.url.pathname, '/events');
  assert.equal(s.url.searchParams.get('token'), 'tok');
  assert.equal(s.url.searchParams.get('name'), 'Ann');
  const [sub] = await waitFor(() => s.posts.length && s.posts, 'the subscribe POST');
  assert.deepEqual(Object.keys(sub).sort(), ['ref', 'since', 'topic', 'type']);
  assert.equal(sub.since, 0);
  s.send({ topic: 'chat', event: 'message', data: 'hi', seq: 4 });
  s.send({ topic: 'chat', event: 'close', data: 'an app event named close', seq: 5 });
  s.send({ topic: '__replay:chat', event: 'end', data: { seq: 5, epoch: 'E1', recovered: true } });
  s.send({ type: 'subscribed', topic: 'chat', ref: sub.ref });
  await waitFor(() => chat.subscribed, 'the ack');
  assert.deepEqual(got, ['hi', 'an app event named close']);
  assert.ok(JSON.parse(storage.getItem('fabric:transport:ws://fabric.test/ws')).until > Date.now(), 'remembered');

  // Frames go out one POST at a time, in order.
  const calls = [client.rpc('a/one'), client.rpc('a/two'), client.rpc('a/three')];
  await waitFor(() => s.posts.length === 4, 'three RPC POSTs');
  assert.deepEqual(s.posts.slice(1).map((f) => f.rpc), ['a/one', 'a/two', 'a/three']);
  for (const f of s.posts.slice(1)) s.send({ topic: '__rpc', event: f.id, data: { id: f.id, ok: true, data: f.rpc } });
  assert.deepEqual(await Promise.all(calls), ['a/one', 'a/two', 'a/three']);

  // The stream drops: reconnect over SSE (remembered), resume with since + epoch.
  s.end();
  await waitFor(() => sse.streams.length === 2 && client.status.get() === 'open', 'reopened');
  assert.equal(WS.instances.length, 1, 'no WebSocket while SSE is remembered');
  const s2 = sse.streams[1];
  const [resub] = await waitFor(() => s2.posts.length && s2.posts, 'the resubscribe');
  assert.equal(resub.since, 5);
  assert.equal(resub.epoch, 'E1');
});

test('the server close event carries the code: 4403 stops, 1001 spreads', async (t) => {
  const { WS, sse, client } = setup({ sse: 'always', random: () => 0.999 });
  t.after(() => client.close());
  client.on('error', () => {});
  const closes = [];
  client.on('close', (c) => closes.push(c));
  await waitFor(() => client.status.get() === 'open', 'open');
  sse.streams[0].close(1001, 'server shutting down');
  await waitFor(() => closes.length === 1, 'a close');
  assert.deepEqual([closes[0].code, closes[0].delay], [1001, 29]);
  await waitFor(() => sse.streams.length === 2 && client.status.get() === 'open', 'reopened');
  sse.streams[1].close(4403, 'forbidden');
  await waitFor(() => client.status.get() === 'error', 'stopped');
  assert.equal(WS.instances.length, 0);
});

test('HTTP refusals: 401 refreshes the token and retries, 403 stops', async (t) => {
  let status = 401;
  let tokens = 0;
  const { sse, client } = setup({ sse: 'always', sseServer: { status: () => status }, getToken: () => 't' + ++tokens });
  t.after(() => client.close());
  client.on('error', () => {});
  await waitFor(() => tokens >= 2, 'a second getToken after the 401');
  status = 200;
  await waitFor(() => client.status.get() === 'open', 'open');
  assert.equal(sse.streams[0].url.searchParams.get('token'), 't' + tokens);

  let st2 = 403;
  const b = setup({ sse: 'always', sseServer: { status: () => st2 } });
  t.after(() => b.client.close());
  b.client.on('error', () => {});
  await waitFor(() => b.client.status.get() === 'error', 'stopped on 403');
  assert.equal(b.client.state.get().error.code, 'FORBIDDEN');
  assert.equal(b.client.state.get().error.status, 403);
});

test('a server that is down fails both transports: no SSE is remembered, the next attempt is a WebSocket again', async (t) => {
  let up = false;
  const { WS, sse, storage, client } = setup({ sseServer: { status: () => (up ? 200 : 503) } });
  t.after(() => client.close());
  await waitFor(() => WS.instances.length === 1, 'WebSocket 1');
  WS.instances[0].fail();
  await waitFor(() => WS.instances.length === 2, 'WebSocket 2, after the SSE probe failed');
  assert.equal(storage.getItem('fabric:transport:ws://fabric.test/ws'), null);
  up = true;
  WS.instances[1].open();
  await waitFor(() => client.status.get() === 'open', 'open');
  assert.equal(client.transport, 'websocket');
  assert.equal(sse.streams.length, 0);
});

test('WebSockets that open and drop at once, three times in a row, switch to SSE', async (t) => {
  const { WS, sse, client } = setup();
  t.after(() => client.close());
  for (let n = 1; n <= 3; n++) {
    await waitFor(() => WS.instances.length === n, 'WebSocket ' + n);
    WS.instances[n - 1].open();
    WS.instances[n - 1].drop(1006);
  }
  await waitFor(() => client.transport === 'sse', 'SSE');
  assert.equal(sse.streams.length, 1);
});
