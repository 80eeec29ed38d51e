// Test doubles for fabric.js: a scriptable WebSocket class, a fetch that
// plays an SSE server, and waitFor.

/** Returns a fresh fake WebSocket class; its `instances` are the sockets made. */
export function fakeWebSocket() {
  class FakeWS {
    static instances = [];
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      FakeWS.instances.push(this);
    }
    send(s) {
      if (this.readyState !== 1) throw new Error('send on a socket that is not open');
      this.sent.push(JSON.parse(s));
    }
    close(code, reason) {
      this.readyState = 3;
      this.closedWith = { code, reason };
    }
    // The server's side:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    recv(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }
    drop(code = 1006, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: '' });
    }
    static get last() {
      return FakeWS.instances[FakeWS.instances.length - 1];
    }
  }
  return FakeWS;
}

/**
 * A fetch that serves SSE streams (GET) and takes frames (POST): `streams`
 * are the GETs made, each with push(text), send(obj) (an event like the
 * server's), end() and its `posts` (the frames POSTed to its session).
 */
export function fakeSSE({ status = 200 } = {}) {
  const streams = [];
  const bySession = new Map();
  let n = 0;
  async function fetch(url, init = {}) {
    const u = new URL(url);
    if ((init.method || 'GET') === 'POST') {
      const s = bySession.get(u.searchParams.get('session'));
      if (!s || s.ended) return new Response('unknown session', { status: 404 });
      s.posts.push(JSON.parse(init.body));
      return new Response(null, { status: 204 });
    }
    if (typeof status === 'function' ? status() !== 200 : status !== 200) {
      const st = typeof status === 'function' ? status() : status;
      return new Response('no', { status: st });
    }
    const enc = new TextEncoder();
    let ctrl;
    const body = new ReadableStream({ start: (c) => (ctrl = c) });
    const s = {
      url: u,
      session: 'sess' + ++n,
      posts: [],
      ended: false,
      push: (text) => ctrl.enqueue(enc.encode(text)),
      send(obj) {
        const event = obj.type || obj.event;
        this.push(`event: ${event}\ndata: ${JSON.stringify(obj)}\n\n`);
      },
      close(code, reason) {
        this.push(`event: close\ndata: ${JSON.stringify({ code, reason })}\n\n`);
        this.end();
      },
      end() {
        if (s.ended) return;
        s.ended = true;
        ctrl.close();
      },
    };
    init.signal?.addEventListener('abort', () => {
      s.ended = true;
      try {
        ctrl.error(new Error('aborted'));
      } catch {
        /* closed */
      }
    });
    streams.push(s);
    bySession.set(s.session, s);
    queueMicrotask(() => s.push(`retry: 1000\nevent: session\ndata: {"session":"${s.session}"}\n\n`));
    return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
  }
  return { fetch, streams };
}

/** A Storage-like map. */
export function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), map: m };
}

/** Waits until cond() is truthy (polling every 2 ms), or fails after ms (5 s). */
export async function waitFor(cond, what = 'a condition', ms = 5000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Lets pending promise callbacks run. */
export const tick = () => new Promise((r) => setTimeout(r, 0));

/** A JWT (unsigned: the client never verifies) with these claims. */
export function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return b64({ alg: 'HS256', typ: 'JWT' }) + '.' + b64(claims) + '.sig';
}
