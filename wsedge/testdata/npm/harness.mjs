// Runs the unmodified svelte-adapter-uws and svelte-realtime browser clients
// against a running Fabric server and prints what they observe, one JSON
// object per line on stdout ({"step": ..., ...}). wsedge/npm_test.go starts
// the server, reacts to some steps (it publishes over POST /api/publish when
// told a subscription is in place) and checks every step.
//
//   node [--experimental-websocket] --import ./register-shim.mjs harness.mjs http://127.0.0.1:PORT
//
// Any failure prints {"step":"error",...} and exits non-zero.

import { readFileSync } from 'node:fs';

const base = new URL(process.argv[2] ?? '');
const STEP_TIMEOUT_MS = 10_000;

function emit(obj) {
	process.stdout.write(JSON.stringify(obj) + '\n');
}

const statuses = [];

function fail(err) {
	emit({ step: 'error', message: String(err?.stack ?? err), statuses });
	process.exit(1);
}
process.on('unhandledRejection', fail);
process.on('uncaughtException', fail);
setTimeout(() => fail(new Error('harness watchdog: gave up after 45s')), 45_000).unref();

// --- The browser environment the clients expect -----------------------------

// The adapter client builds its URL from window.location (ws: + host + /ws),
// as it would on a page served by the Fabric server at `base`.
globalThis.window = {
	location: {
		protocol: base.protocol,
		host: base.host,
		hostname: base.hostname,
		port: base.port,
		origin: base.origin,
		href: base.href,
		pathname: '/'
	}
};

// A browser's WebSocket sends the page's Origin on the upgrade request;
// Node's (undici) sends none, which Fabric's default same-origin check
// refuses, as it should. This subclass adds the Origin a page at `base`
// would send and changes nothing else, so the server keeps its default
// origin policy in this test.
if (typeof globalThis.WebSocket !== 'function') {
	fail(new Error('no global WebSocket: run node >= 22, or node >= 20.10 with --experimental-websocket'));
}
const NodeWebSocket = globalThis.WebSocket;
globalThis.WebSocket = class BrowserWebSocket extends NodeWebSocket {
	constructor(url, protocols) {
		super(url, { protocols: protocols ?? [], headers: { Origin: base.origin } });
	}
};

// --- Helpers ------------------------------------------------------------------

function within(ms, promise, what) {
	let timer;
	return Promise.race([
		promise,
		new Promise((_, reject) => {
			timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms waiting for ${what}`)), ms);
		})
	]).finally(() => clearTimeout(timer));
}

// Resolves with the first value of store (after its initial one) that
// satisfies pred. The subscription starts now, so nothing sent after this
// call is missed.
function nextValue(store, pred, what) {
	let unsub = null;
	let first = true;
	let done = false;
	const p = new Promise((resolve) => {
		unsub = store.subscribe((v) => {
			if (first) {
				first = false;
				return;
			}
			if (!done && pred(v)) {
				done = true;
				resolve(v);
			}
		});
	});
	return within(STEP_TIMEOUT_MS, p, what).finally(() => queueMicrotask(() => unsub()));
}

function describeError(e) {
	return {
		isRpcError: e instanceof RpcError,
		code: e?.code ?? null,
		message: e?.message ?? String(e),
		issues: e?.issues ?? null
	};
}

function settled(results) {
	return results.map((r) =>
		r.status === 'fulfilled' ? { ok: true, value: r.value } : { ok: false, ...describeError(r.reason) }
	);
}

// --- The clients, imported after the environment exists ----------------------

const adapter = await import('svelte-adapter-uws/client');
const realtime = await import('svelte-realtime/client');
const { onReplay } = await import('svelte-adapter-uws/plugins/replay/client');
const { presence } = await import('svelte-adapter-uws/plugins/presence/client');
const { RpcError, __rpc, batch } = realtime;

adapter.status.subscribe((s) => statuses.push(s));

const installed = (name) =>
	JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8')).version;

emit({
	step: 'loaded',
	versions: Object.fromEntries(['svelte', 'svelte-adapter-uws', 'svelte-realtime'].map((n) => [n, installed(n)])),
	adapterExports: Object.keys(adapter).sort(),
	realtimeShimmed: ['onDerived', 'failure'].filter((k) => k in realtime)
});

// 1. Subscribe with the adapter client; the Go test publishes over
//    POST /api/publish once the server has the subscription.
const chat = adapter.on('chat');
const chatMessage = nextValue(chat, (v) => v !== null, "a message on 'chat'");
chatMessage.catch(() => {}); // awaited below; a failed open is reported first
await within(STEP_TIMEOUT_MS, adapter.ready(), 'the connection to open');
emit({ step: 'subscribed', topic: 'chat' });
emit({ step: 'message', envelope: await chatMessage });

// 2. RPCs through svelte-realtime to Go handlers.
const echo = __rpc('chat/echo');
emit({ step: 'rpc', result: await within(STEP_TIMEOUT_MS, echo({ text: 'hi ✓' }, 21), 'chat/echo') });

for (const [step, path] of [
	['rpc-missing', 'chat/missing'],
	['rpc-live-error', 'chat/validate'],
	['rpc-internal', 'chat/boom']
]) {
	try {
		const v = await within(STEP_TIMEOUT_MS, __rpc(path)(), path);
		emit({ step, resolved: true, value: v });
	} catch (e) {
		emit({ step, resolved: false, ...describeError(e) });
	}
}

// 3. batch(): one {"batch":[...]} frame, answered by one __batch envelope.
{
	const add = __rpc('chat/add');
	const missing = __rpc('chat/missing');
	const calls = [];
	const all = batch(() => {
		calls.push(add(1, 2), add(40, 2), missing('x'));
		return calls;
	});
	all.catch(() => {}); // one call fails by design; each is reported below
	emit({ step: 'batch', results: settled(await within(STEP_TIMEOUT_MS, Promise.allSettled(calls), 'batch')) });

	const next = __rpc('chat/next');
	const seq = await within(
		STEP_TIMEOUT_MS,
		batch(() => [next.fresh(), next.fresh(), next.fresh()], { sequential: true }),
		'sequential batch'
	);
	emit({ step: 'batch-sequential', results: seq });
}

// 4. Presence client: subscribes to __presence:room. The server keeps no
//    presence yet; nothing may break. The RPC after it is a barrier: the
//    server handles a connection's frames in order.
{
	const users = presence('room');
	let value;
	const unsub = users.subscribe((v) => (value = v));
	await within(STEP_TIMEOUT_MS, echo.fresh({ text: 'barrier' }, 0), 'barrier RPC');
	emit({ step: 'presence', topic: '__presence:room', value });
	unsub();
}

// 5. Replay client: subscribes to 'feed', sends {"type":"replay","topic":
//    "feed","since":3} and holds live messages back until "end" arrives on
//    __replay:feed. A server without history answers "end" at once; then the
//    Go test publishes to 'feed', which must come through.
{
	const raw = adapter.on('__replay:feed');
	const end = nextValue(raw, (v) => v?.event === 'end', "'end' on __replay:feed");
	const feed = onReplay('feed', { since: 3 });
	const live = nextValue(feed, (v) => v !== null, "a live message through onReplay('feed')");
	emit({ step: 'replay-end', envelope: await end });
	emit({ step: 'subscribed', topic: 'feed' });
	emit({ step: 'replay-live', envelope: await live });
}

// 6. Replay client against real history: 'log' is persistent. The page's
//    load() would hand over a seq; here GET /test/history publishes three
//    messages and answers their seqs. Resuming after the first must yield
//    the other two from the history, then 'end', then a live one.
{
	const res = await within(STEP_TIMEOUT_MS, fetch(new URL('/test/history', base)), 'GET /test/history');
	const { seqs } = await res.json();
	const raw = adapter.on('__replay:log');
	const end = nextValue(raw, (v) => v?.event === 'end', "'end' on __replay:log");
	const values = [];
	const unsub = onReplay('log', { since: seqs[0] }).subscribe((v) => {
		if (v !== null) values.push({ topic: v.topic, event: v.event, data: v.data });
	});
	const endEnvelope = await end;
	emit({ step: 'subscribed', topic: 'log' });
	await within(
		STEP_TIMEOUT_MS,
		new Promise((resolve) => {
			const t = setInterval(() => values.length >= 3 && (clearInterval(t), resolve()), 10);
		}),
		'two replayed and one live message on log'
	);
	emit({ step: 'replay-history', end: endEnvelope.data, values });
	unsub();
}

emit({ step: 'done', statuses });
adapter.connect().close();
process.exit(0);
