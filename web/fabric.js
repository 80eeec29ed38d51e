/**
 * fabric.js: the browser client of Fabric, a realtime pub/sub server.
 *
 * One dependency-free ES module; no build step. It speaks Fabric's wire
 * protocol (docs/protocol.md) over a WebSocket, or over Server-Sent Events
 * with POSTed frames when a WebSocket cannot be opened, and:
 *
 * - reconnects by itself, with exponential backoff and full jitter (a
 *   server restart's 1001 spreads the first retries over seconds);
 * - resumes every persistent topic from the last `seq` and `epoch` it saw,
 *   identically on both transports, and says when a resume was not
 *   complete (`recovered: false`, the "reload" event);
 * - passes a token as `?token=` and refreshes it (getToken);
 * - makes RPC calls in the svelte-realtime wire shape (timeouts, error
 *   codes, an offline queue);
 * - tracks presence;
 * - exposes topics, presence and the connection status as stores in
 *   Svelte's store contract (a `subscribe` method), without Svelte.
 *
 * ```js
 * import { connect } from '/fabric.js';
 * const fabric = connect({ getToken: () => fetch('/token').then(r => r.text()) });
 * const chat = fabric.topic('chat:lobby', { history: true, keep: 100 });
 * chat.subscribe(messages => render(messages));
 * await chat.publish('message', { text: 'hi' });
 * ```
 *
 * See docs/client.md for the whole API.
 * @module fabric
 */

/** This file's version (the npm package's). */
export const VERSION = '0.1.0';

/**
 * An error from Fabric or from the client: RPC failures carry the server's
 * code (NOT_FOUND, VALIDATION, RATE_LIMITED, ...), the client's own are
 * TIMEOUT, DISCONNECTED, QUEUE_FULL, CONNECTION_CLOSED, FORBIDDEN,
 * TOKEN_EXPIRED, TOKEN_ERROR, POLICY.
 */
export class FabricError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{issues?: unknown, retryAfter?: number, topic?: string, status?: number, closeCode?: number}} [details]
   */
  constructor(code, message, details) {
    super(message || code);
    this.name = 'FabricError';
    /** @type {string} */
    this.code = code;
    if (details) {
      for (const k of ['issues', 'retryAfter', 'topic', 'status', 'closeCode']) {
        if (details[k] !== undefined) this[k] = details[k];
      }
    }
  }
}

/** svelte-realtime's name for the same error. */
export const RpcError = FabricError;

/**
 * A store in Svelte's contract: `subscribe(run)` calls `run` with the
 * current value at once and on every change, and returns the function that
 * unsubscribes. `start`, when given, runs when the first subscriber comes
 * and may return a function that runs when the last one leaves.
 * @template T
 * @param {T} value
 * @param {(set: (v: T) => void) => (void | (() => void))} [start]
 */
export function writable(value, start) {
  const subs = new Set();
  let stop = null;
  const set = (v) => {
    value = v;
    for (const run of [...subs]) run(v);
  };
  return {
    /** @returns {T} */
    get: () => value,
    set,
    /** @param {(v: T) => T} f */
    update: (f) => set(f(value)),
    /** @param {(v: T) => void} run */
    subscribe(run) {
      subs.add(run);
      if (subs.size === 1 && start) stop = start(set) || null;
      run(value);
      return () => {
        if (subs.delete(run) && subs.size === 0 && stop) {
          const s = stop;
          stop = null;
          s();
        }
      };
    },
  };
}

/** Reconnect defaults (milliseconds). */
export const RECONNECT_DEFAULTS = Object.freeze({
  /** The first backoff window: a retry after a drop waits 0..base. */
  base: 500,
  /** The largest window: retries wait at most this long. */
  cap: 30000,
  /** After a 1001 (server going away), retries wait 0..goingAwaySpread at least. */
  goingAwaySpread: 5000,
  /** A connection open this long resets the backoff. */
  stableAfter: 10000,
});

/**
 * The delay before reconnect attempt number `attempt` (0 for the first
 * after a drop): exponential backoff with full jitter, uniform in
 * [0, min(cap, base * 2^attempt)). When the drop was a 1001 (a server
 * shutting down or restarting: every one of its clients gets it at once)
 * the window is at least goingAwaySpread, from the first attempt on: the
 * clients' attempts, and those retried while the server is still down,
 * spread over seconds instead of arriving together.
 * @param {number} attempt
 * @param {number} [closeCode] the close code of the drop that started the reconnecting
 * @param {Partial<typeof RECONNECT_DEFAULTS>} [opts]
 * @param {() => number} [random]
 * @returns {number} milliseconds
 */
export function reconnectDelay(attempt, closeCode, opts = {}, random = Math.random) {
  const o = { ...RECONNECT_DEFAULTS, ...opts };
  const floor = closeCode === 1001 ? o.goingAwaySpread : 0;
  const span = Math.min(o.cap, Math.max(floor, o.base * 2 ** Math.min(Math.max(0, attempt), 30)));
  return Math.floor(random() * span);
}

/**
 * The `exp` claim (unix seconds) of a JWT, read without verifying it;
 * undefined for an opaque token or one without `exp`.
 * @param {string | undefined | null} token
 * @returns {number | undefined}
 */
export function tokenExpiry(token) {
  if (typeof token !== 'string') return undefined;
  const parts = token.split('.');
  if (parts.length !== 3) return undefined;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims?.exp === 'number' && Number.isFinite(claims.exp) ? claims.exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * An incremental text/event-stream parser (the WHATWG algorithm): push
 * decoded text as it arrives; every complete event is handed to onEvent as
 * {event, data, id}. Comments (": ping") are skipped.
 */
export class SSEParser {
  /** @param {(ev: {event: string, data: string, id: string | null}) => void} onEvent */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buf = '';
    this.event = '';
    this.data = [];
    this.id = null;
  }

  /** @param {string} text */
  push(text) {
    this.buf += text;
    let start = 0;
    for (;;) {
      let i = start;
      const n = this.buf.length;
      while (i < n && this.buf[i] !== '\n' && this.buf[i] !== '\r') i++;
      if (i >= n) break;
      if (this.buf[i] === '\r' && i + 1 >= n) break; // maybe \r\n split over chunks
      this.line(this.buf.slice(start, i));
      start = i + (this.buf[i] === '\r' && this.buf[i + 1] === '\n' ? 2 : 1);
    }
    this.buf = this.buf.slice(start);
  }

  /** @param {string} line */
  line(line) {
    if (line === '') {
      if (this.data.length) this.onEvent({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
      this.event = '';
      this.data = [];
      return;
    }
    if (line[0] === ':') return;
    const c = line.indexOf(':');
    const field = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? '' : line.slice(c + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.event = value;
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

// ---------------------------------------------------------------------------
// Transports: each calls client._opened(t), client._frame(t, obj) and,
// once, client._closed(t, info).

/** A WebSocket connection. */
class WSTransport {
  constructor(client, url) {
    this.client = client;
    this.url = url;
    this.kind = 'websocket';
    this.opened = false;
    this.ended = false;
  }

  start() {
    const c = this.client;
    let ws;
    try {
      ws = new c._WebSocket(this.url);
    } catch (e) {
      Promise.resolve().then(() => this.end({ code: 1006, reason: String(e?.message || e) }));
      return;
    }
    this.ws = ws;
    this.timer = setTimeout(() => this.close(1006, 'connect timeout', 'timeout'), c.opts.connectTimeout);
    ws.onopen = () => {
      clearTimeout(this.timer);
      this.opened = true;
      c._opened(this);
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== 'string') return;
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch {
        return;
      }
      c._frame(this, m);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (ev) => this.end({ code: ev.code || 1006, reason: ev.reason || '' });
  }

  /** @param {string} text */
  send(text) {
    if (this.ended || !this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(text);
    return true;
  }

  /** Ends the connection from this side (the client's close, offline, a timeout). */
  close(code = 1000, reason = '', local = 'client') {
    if (this.ended) return;
    const ws = this.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(code >= 3000 || code === 1000 ? code : 1000, reason);
      } catch {
        /* already closed */
      }
    }
    this.end({ code, reason, local });
  }

  end(info) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    this.client._closed(this, { ...info, opened: this.opened });
  }
}

/**
 * A Server-Sent Events stream read with fetch, and frames sent as
 * POST /events?session=ID, one at a time, in order. fetch rather than
 * EventSource: EventSource delivers a named event only to a listener
 * registered for that name (Fabric names events after the application's
 * events), hides the HTTP status of a refusal (401, 403, 503), and
 * reconnects by itself; the client reconnects and resumes itself, the same
 * way on both transports.
 */
class SSETransport {
  constructor(client, url, postBase) {
    this.client = client;
    this.url = url;
    this.postBase = postBase;
    this.kind = 'sse';
    this.opened = false;
    this.ended = false;
    this.queue = [];
    this.posting = false;
  }

  start() {
    const c = this.client;
    this.ctrl = new AbortController();
    this.timer = setTimeout(() => this.close(1006, 'connect timeout', 'timeout'), c.opts.connectTimeout);
    const parser = new SSEParser((ev) => this.event(ev));
    c._fetch(this.url, {
      headers: { Accept: 'text/event-stream' },
      cache: 'no-store',
      credentials: 'same-origin',
      signal: this.ctrl.signal,
    })
      .then(async (res) => {
        if (!res.ok) {
          const ra = Number(res.headers.get('Retry-After'));
          const code = res.status === 401 ? 4401 : res.status === 403 ? 4403 : 1006;
          this.end({ code, reason: `HTTP ${res.status}`, status: res.status, retryAfter: ra > 0 ? ra * 1000 : undefined });
          return;
        }
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        this.alive();
        for (;;) {
          const { value, done } = await reader.read();
          if (this.ended) return;
          if (done) break;
          this.alive();
          parser.push(dec.decode(value, { stream: true }));
        }
        this.end({ code: this.closeCode ?? 1006, reason: this.closeReason ?? 'stream ended' });
      })
      .catch((e) => this.end({ code: 1006, reason: String(e?.message || e) }));
  }

  /** Restarts the idle watchdog: the server writes a comment every 15 s. */
  alive() {
    clearTimeout(this.idle);
    this.idle = setTimeout(() => this.close(1006, 'stream idle', 'timeout'), this.client.opts.sseIdleTimeout);
  }

  event({ event, data }) {
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return;
    }
    const plain = m && typeof m === 'object' && !Array.isArray(m) && typeof m.topic !== 'string' && typeof m.type !== 'string';
    if (plain && event === 'session' && typeof m.session === 'string' && !this.session) {
      this.session = m.session;
      clearTimeout(this.timer);
      this.opened = true;
      this.client._opened(this);
      return;
    }
    if (plain && event === 'close' && typeof m.code === 'number') {
      this.closeCode = m.code;
      this.closeReason = typeof m.reason === 'string' ? m.reason : '';
      return;
    }
    this.client._frame(this, m);
  }

  /** @param {string} text */
  send(text) {
    if (this.ended || !this.session) return false;
    this.queue.push(text);
    this.pump();
    return true;
  }

  async pump() {
    if (this.posting) return;
    this.posting = true;
    const sep = this.postBase.includes('?') ? '&' : '?';
    const url = this.postBase + sep + 'session=' + encodeURIComponent(this.session);
    while (this.queue.length && !this.ended) {
      const body = this.queue.shift();
      try {
        const res = await this.client._fetch(url, {
          method: 'POST',
          body,
          headers: { 'Content-Type': 'text/plain;charset=UTF-8' },
          cache: 'no-store',
          credentials: 'same-origin',
        });
        if (res.status === 404) {
          this.close(1006, 'session gone', 'post');
          break;
        }
        if (res.status === 413) this.client._error(new FabricError('PAYLOAD_TOO_LARGE', 'frame too large for the server'));
      } catch (e) {
        this.close(1006, 'post failed: ' + String(e?.message || e), 'post');
        break;
      }
    }
    this.posting = false;
  }

  close(code = 1000, reason = '', local = 'client') {
    this.end({ code, reason, local });
  }

  end(info) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    clearTimeout(this.idle);
    try {
      this.ctrl.abort();
    } catch {
      /* nothing to abort */
    }
    this.client._closed(this, { ...info, opened: this.opened });
  }
}

// ---------------------------------------------------------------------------

/** How many recent sequences a topic remembers to drop duplicates. */
const RECENT = 64;

/**
 * One topic: a store whose value is the last message (or, with `keep`, the
 * last `keep` messages), message handlers, and its resume state. The server
 * subscription is held while the store has subscribers or handlers.
 */
export class Topic {
  /** @param {FabricClient} client @param {string} name @param {TopicOptions} opts */
  constructor(client, name, opts) {
    this.client = client;
    /** The topic's name. */
    this.name = name;
    this._opts = { ...opts };
    this._handlers = new Set();
    this._resumeHandlers = new Set();
    this._refs = 0;
    this._active = false;
    this._waiters = [];
    this._reset();
    this._store = writable(this._initialValue(), () => {
      this._acquire();
      return () => this._release();
    });
  }

  _initialValue() {
    return this._opts.keep > 0 ? [] : null;
  }

  /** Resets the resume state (a new activation). */
  _reset() {
    const o = this._opts;
    this._seq = typeof o.since === 'number' ? o.since : 0;
    this._epoch = o.epoch || '';
    this._persistent = !!(o.persistent || o.history || typeof o.since === 'number');
    this._started = false; // a subscribe was sent in this activation
    this._acked = false;
    this._resuming = false;
    this._resumeMax = 0;
    this._replayed = 0;
    this._recent = [];
    this._denied = null;
  }

  _merge(opts) {
    for (const k of ['history', 'persistent']) if (opts[k]) this._opts[k] = true;
    if (opts.keep > (this._opts.keep || 0)) this._opts.keep = opts.keep;
    if (typeof opts.since === 'number' && !this._active) {
      this._opts.since = opts.since;
      this._opts.epoch = opts.epoch;
    }
    if (!this._active) this._reset();
  }

  /**
   * Svelte's store contract: `run` gets the last message (or the last
   * `keep` messages) now and on every message.
   * @param {(value: any) => void} run
   * @returns {() => void} unsubscribe
   */
  subscribe(run) {
    return this._store.subscribe(run);
  }

  /**
   * Calls `handler` for every message of the topic (with an event name,
   * only for that event). Holds the subscription until the returned
   * function is called.
   * @param {string | ((msg: Message) => void)} event
   * @param {(msg: Message) => void} [handler]
   * @returns {() => void}
   */
  on(event, handler) {
    const h = typeof event === 'function' ? { event: null, fn: event } : { event, fn: handler };
    this._handlers.add(h);
    this._acquire();
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this._handlers.delete(h);
      this._release();
    };
  }

  /**
   * Calls `handler` after every resume of the topic (and after the history
   * asked with `history: true`) with {recovered, seq, epoch, replayed}.
   * @param {(r: ResumeInfo) => void} handler
   * @returns {() => void}
   */
  onResume(handler) {
    this._resumeHandlers.add(handler);
    return () => this._resumeHandlers.delete(handler);
  }

  /**
   * Publishes to the topic (the server's fabric/publish call; the topic must
   * allow client publishes). Resolves to {seq} (0 on topics without history).
   * @param {string} event @param {unknown} [data] @param {CallOptions} [opts]
   */
  publish(event, data, opts) {
    return this.client.publish(this.name, event, data, opts);
  }

  /** The last sequence received (0: none). */
  get seq() {
    return this._seq;
  }

  /** The history epoch the sequence belongs to ('' until a resume told it). */
  get epoch() {
    return this._epoch;
  }

  /** The store's current value. */
  get value() {
    return this._store.get();
  }

  /** Whether the server acknowledged the subscription on this connection. */
  get subscribed() {
    return this._acked;
  }

  /**
   * Resolves once the server acknowledged the subscription (after the
   * replay, for a resume); rejects with FabricError when it was denied.
   * @returns {Promise<void>}
   */
  ready() {
    if (this._acked) return Promise.resolve();
    if (this._denied) return Promise.reject(this._denied);
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  _acquire() {
    this._refs++;
    if (this._refs !== 1) return;
    if (this._linger) {
      clearTimeout(this._linger);
      this._linger = null;
      return;
    }
    this._reset();
    if (this._dirty) {
      this._dirty = false;
      this._store.set(this._initialValue()); // not the last activation's messages
    }
    this._active = true;
    this.client._subscribeTopic(this);
  }

  _release() {
    this._refs--;
    if (this._refs > 0) return;
    this._linger = setTimeout(() => {
      this._linger = null;
      if (this._refs > 0) return;
      this._active = false;
      this._acked = false;
      this.client._unsubscribeTopic(this);
    }, this.client.opts.linger);
  }

  /** The subscribe frame for this connection. */
  _frame(ref) {
    const f = { type: 'subscribe', topic: this.name, ref };
    let since;
    if (!this._started) {
      if (typeof this._opts.since === 'number') since = this._opts.since;
      else if (this._opts.history) since = 0;
    } else if (this._persistent) {
      since = this._seq;
    }
    this._started = true;
    this._acked = false;
    this._denied = null;
    this._resuming = since !== undefined;
    this._resumeMax = 0;
    this._replayed = 0;
    if (since !== undefined) {
      f.since = since;
      if (this._epoch) f.epoch = this._epoch;
    }
    return f;
  }

  _deliver(m) {
    if (typeof m.seq === 'number' && m.seq > 0) {
      if (!this._resuming && this._recent.includes(m.seq)) {
        this.client._duplicates++;
        return;
      }
      if (!this._resuming && this._seq && m.seq < this._seq) this._epoch = ''; // a new history: its epoch is unknown
      this._recent.push(m.seq);
      if (this._recent.length > RECENT) this._recent.shift();
      this._seq = m.seq;
      this._persistent = true;
      if (this._resuming) {
        this._resumeMax = Math.max(this._resumeMax, m.seq);
        this._replayed++;
      }
    }
    this._dirty = true;
    const keep = this._opts.keep;
    if (keep > 0) {
      const list = this._store.get();
      const next = list.length >= keep ? list.slice(list.length - keep + 1) : list.slice();
      next.push(m);
      this._store.set(next);
    } else {
      this._store.set(m);
    }
    for (const h of [...this._handlers]) {
      if (h.event !== null && h.event !== m.event) continue;
      try {
        h.fn(m);
      } catch (e) {
        this.client._error(e);
      }
    }
  }

  _end(d) {
    if (typeof d.epoch === 'string' && d.epoch) this._epoch = d.epoch;
    if (typeof d.seq === 'number') this._seq = Math.max(d.seq, this._resumeMax);
    this._persistent = true;
    this._resuming = false;
    const info = {
      topic: this.name,
      recovered: d.recovered !== false,
      seq: this._seq,
      epoch: this._epoch,
      replayed: this._replayed,
    };
    if (d.error) info.error = d.error;
    for (const h of [...this._resumeHandlers]) {
      try {
        h(info);
      } catch (e) {
        this.client._error(e);
      }
    }
    this.client._emit('resume', info);
    if (!info.recovered) this.client._emit('reload', info);
  }

  _ack() {
    this._acked = true;
    this._resuming = false;
    for (const w of this._waiters.splice(0)) w.resolve();
  }

  _deny(reason) {
    this._acked = false;
    this._resuming = false;
    this._denied = new FabricError(reason || 'FORBIDDEN', `subscribe ${this.name} denied: ${reason}`, { topic: this.name });
    for (const w of this._waiters.splice(0)) w.reject(this._denied);
  }
}

/**
 * Presence on a topic: a store of its members [{key, data}], one per user
 * (the server dedupes a user's tabs). Watching (subscribing to the store)
 * does not make you a member; join() does.
 */
export class Presence {
  /** @param {FabricClient} client @param {string} topic */
  constructor(client, topic) {
    this.client = client;
    /** The topic whose presence this is. */
    this.topic = topic;
    this._members = new Map();
    this._handlers = new Set();
    this._store = writable([], () => {
      const off = client.topic('__presence:' + topic).on((m) => this._apply(m));
      return () => {
        off();
        this._members.clear();
        this._store.set([]);
      };
    });
  }

  /**
   * Svelte's store contract: the members, [{key, data}].
   * @param {(members: Member[]) => void} run
   */
  subscribe(run) {
    return this._store.subscribe(run);
  }

  /** The members now. */
  get members() {
    return this._store.get();
  }

  /** How many members there are. */
  get count() {
    return this._store.get().length;
  }

  /**
   * Calls handler on "join", "leave" (with the member) and "list" (with
   * the members). Holds the presence subscription.
   * @param {'join' | 'leave' | 'list'} event
   * @param {(arg: any) => void} handler
   */
  on(event, handler) {
    const h = { event, fn: handler };
    this._handlers.add(h);
    const off = this._store.subscribe(() => {});
    return () => {
      this._handlers.delete(h);
      off();
    };
  }

  /**
   * Joins: subscribes to the topic itself, which makes this connection a
   * member (its user data comes from the server's Connect hook). Returns
   * leave.
   * @returns {() => void}
   */
  join() {
    if (!this._leave) this._leave = this.client.topic(this.topic).on(() => {});
    return () => this.leave();
  }

  /** Leaves: drops the subscription join() made. */
  leave() {
    const l = this._leave;
    this._leave = null;
    if (l) l();
  }

  _apply(m) {
    const d = m.data;
    switch (m.event) {
      case 'list':
        this._members = new Map();
        if (Array.isArray(d)) for (const e of d) if (e && typeof e.key === 'string') this._members.set(e.key, { key: e.key, data: e.data ?? null });
        break;
      case 'join':
        if (d && typeof d.key === 'string') this._members.set(d.key, { key: d.key, data: d.data ?? null });
        break;
      case 'leave':
        if (d && typeof d.key === 'string') this._members.delete(d.key);
        break;
      case 'heartbeat':
        if (Array.isArray(d)) {
          const present = new Set(d);
          for (const k of [...this._members.keys()]) if (!present.has(k)) this._members.delete(k);
        }
        break;
      default:
        return;
    }
    const list = [...this._members.values()];
    this._store.set(list);
    const arg = m.event === 'list' ? list : m.event === 'heartbeat' ? null : { key: d.key, data: d.data ?? null };
    for (const h of [...this._handlers]) {
      if (h.event !== m.event) continue;
      try {
        h.fn(arg);
      } catch (e) {
        this.client._error(e);
      }
    }
  }
}

// ---------------------------------------------------------------------------

const CLIENT_DEFAULTS = {
  tokenParam: 'token',
  refreshBefore: 30000,
  sse: 'auto',
  rememberSSE: 10 * 60 * 1000,
  wsFailuresBeforeSSE: 3,
  connectTimeout: 15000,
  sseIdleTimeout: 45000,
  rpcTimeout: 30000,
  offline: 'queue',
  maxQueue: 100,
  linger: 100,
  watchNetwork: true,
};

/**
 * Connects to Fabric and returns the client (it connects at once and keeps
 * reconnecting until close()).
 * @param {string | ClientOptions} [url] the WebSocket URL (default: /ws of the page's host), or the options
 * @param {ClientOptions} [options]
 * @returns {FabricClient}
 */
export function connect(url, options) {
  if (url && typeof url === 'object') return new FabricClient(url);
  return new FabricClient({ ...(options || {}), url });
}

/** A connection to Fabric that survives drops; see connect(). */
export class FabricClient {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    const o = { ...CLIENT_DEFAULTS, ...options };
    o.reconnect = { ...RECONNECT_DEFAULTS, ...(options.reconnect || {}) };
    this.opts = o;
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    this._fetch = o.fetch || ((...a) => globalThis.fetch(...a));
    this._random = o.random || Math.random;
    this._storage = o.storage !== undefined ? o.storage : safeLocalStorage();
    const base = globalThis.location?.href;
    const ws = new URL(o.url || '/ws', base);
    if (ws.protocol === 'http:') ws.protocol = 'ws:';
    if (ws.protocol === 'https:') ws.protocol = 'wss:';
    this._wsURL = ws;
    const sse = o.sseUrl ? new URL(o.sseUrl, base) : new URL('/events', ws);
    if (sse.protocol === 'ws:') sse.protocol = 'http:';
    if (sse.protocol === 'wss:') sse.protocol = 'https:';
    this._sseURL = sse;
    this._token = o.token;
    this._topics = new Map();
    this._presences = new Map();
    this._listeners = new Map();
    this._subRefs = new Map();
    this._rpcs = new Map();
    this._refreshWaiters = new Map();
    this._seq = 0;
    this._attempt = 0;
    this._duplicates = 0;
    this._wsQuickFailures = 0;
    this._dropCode = undefined; // the close code that started this reconnecting
    this._transport = null;
    this._closing = false;
    this._everOpened = false;
    /** The connection state as a store: {status, transport, attempt, retryAt, code, reason, error}. */
    this.state = writable({ status: 'connecting', transport: null, attempt: 0, retryAt: null, code: null, reason: '', error: null });
    const statusStore = writable('connecting');
    this.state.subscribe((s) => {
      if (statusStore.get() !== s.status) statusStore.set(s.status);
    });
    /**
     * The status as a store: 'connecting' (first attempt), 'open',
     * 'reconnecting', 'offline' (the browser is offline), 'closed' (close(),
     * or a 1008 policy close) or 'error' (4403 forbidden, an expired token
     * without getToken).
     */
    this.status = { subscribe: (run) => statusStore.subscribe(run), get: () => statusStore.get() };
    this._onOffline = () => this._networkDown();
    this._onOnline = () => this._networkUp();
    if (o.watchNetwork && typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('offline', this._onOffline);
      globalThis.addEventListener('online', this._onOnline);
    }
    if (o.watchNetwork && globalThis.navigator && globalThis.navigator.onLine === false) {
      this._setState({ status: 'offline' });
    } else {
      this._attemptNow();
    }
  }

  // -- public API -----------------------------------------------------------

  /**
   * The topic named `name` (one object per name; options given later add
   * to the first ones: history, persistent, a larger keep).
   * @param {string} name
   * @param {TopicOptions} [opts]
   * @returns {Topic}
   */
  topic(name, opts = {}) {
    let t = this._topics.get(name);
    if (!t) {
      t = new Topic(this, name, opts);
      this._topics.set(name, t);
    } else {
      t._merge(opts);
    }
    return t;
  }

  /**
   * Subscribes handler to every message of `name` (see Topic.on); returns
   * the function that unsubscribes.
   * @param {string} name
   * @param {(msg: Message) => void} handler
   * @param {TopicOptions} [opts]
   */
  subscribe(name, handler, opts) {
    return this.topic(name, opts).on(handler);
  }

  /**
   * The presence of `topic` (one object per topic).
   * @param {string} topic
   * @returns {Presence}
   */
  presence(topic) {
    let p = this._presences.get(topic);
    if (!p) {
      p = new Presence(this, topic);
      this._presences.set(topic, p);
    }
    return p;
  }

  /**
   * Calls an RPC handler: `rpc('chat/send', text)`. Resolves with its
   * result; rejects with FabricError (see call()).
   * @param {string} path
   * @param {...unknown} args
   */
  rpc(path, ...args) {
    return this.call(path, args);
  }

  /**
   * Calls an RPC handler with an argument list and options. While
   * disconnected the call waits in a queue (offline: 'queue', the default;
   * at most maxQueue calls, the oldest is rejected with QUEUE_FULL) and is
   * sent once connected, or is rejected at once with DISCONNECTED (offline:
   * 'fail'). A call sent on a connection that drops before its answer is
   * rejected with DISCONNECTED: it may or may not have run. The timeout
   * (default 30 s) counts from the call, queue time included: TIMEOUT.
   * @param {string} path
   * @param {unknown[]} [args]
   * @param {CallOptions} [opts]
   * @returns {Promise<any>}
   */
  call(path, args = [], opts = {}) {
    if (this._closing || this._fatal) {
      return Promise.reject(new FabricError('CONNECTION_CLOSED', 'the client is closed'));
    }
    const id = (++this._seq).toString(36);
    const frame = { rpc: path, id, args: Array.isArray(args) ? args : [args] };
    const offline = opts.offline || this.opts.offline;
    const timeout = opts.timeout || this.opts.rpcTimeout;
    return new Promise((resolve, reject) => {
      const entry = { id, frame, resolve, reject, sent: false, timer: null };
      entry.timer = setTimeout(() => {
        this._rpcs.delete(id);
        reject(new FabricError('TIMEOUT', `RPC ${path} timed out after ${timeout} ms`));
      }, timeout);
      if (this._send(frame)) {
        entry.sent = true;
        this._rpcs.set(id, entry);
        return;
      }
      if (offline === 'fail') {
        clearTimeout(entry.timer);
        reject(new FabricError('DISCONNECTED', `not connected: RPC ${path} not sent`));
        return;
      }
      let queued = 0;
      let oldest = null;
      for (const e of this._rpcs.values()) {
        if (!e.sent) {
          queued++;
          oldest = oldest || e;
        }
      }
      if (queued >= this.opts.maxQueue && oldest) {
        this._rpcs.delete(oldest.id);
        clearTimeout(oldest.timer);
        oldest.reject(new FabricError('QUEUE_FULL', 'offline queue full: the oldest call was dropped'));
      }
      this._rpcs.set(id, entry);
    });
  }

  /**
   * Publishes an event to a topic that allows client publishes (the
   * fabric/publish call). Resolves to {seq}.
   * @param {string} topic @param {string} event @param {unknown} [data] @param {CallOptions} [opts]
   */
  publish(topic, event, data, opts) {
    return this.call('fabric/publish', [topic, event, data === undefined ? null : data], opts);
  }

  /**
   * Listens to the client's events: "status" (the status string), "open"
   * ({transport, reconnected}), "close" ({code, reason, reconnect, delay}),
   * "resume" and "reload" (ResumeInfo; "reload" when recovered is false),
   * "denied" ({topic, reason}), "refreshed" ({exp}), "error" (an Error),
   * "message" (every envelope). Returns the function that stops listening.
   * @param {string} event
   * @param {(arg: any) => void} handler
   */
  on(event, handler) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /** The transport in use: "websocket", "sse", or null while disconnected. */
  get transport() {
    return this.state.get().transport;
  }

  /** Messages dropped as duplicates (the same seq twice): 0 unless something misbehaves. */
  get duplicates() {
    return this._duplicates;
  }

  /**
   * Connects now: after close(), after a 1008 or 4403 close, while waiting
   * for a retry, or while the browser says it is offline.
   */
  reconnect() {
    this._closing = false;
    this._fatal = null;
    if (this._transport) return;
    clearTimeout(this._retryTimer);
    this._attemptNow();
  }

  /**
   * Asks getToken for a new token and sends it to the server now (the
   * client does this by itself when the server asks and ~30 s before the
   * token's exp). Resolves to the new exp (unix seconds, or undefined).
   */
  refreshToken() {
    return this._refresh();
  }

  /** Closes the connection for good (reconnect() opens it again). */
  close() {
    this._closing = true;
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    if (this._transport) this._transport.close(1000, 'client closed');
    else this._setState({ status: 'closed', retryAt: null });
    this._failAll(new FabricError('CONNECTION_CLOSED', 'the client is closed'));
  }

  /** Removes the client's online/offline listeners (after close()). */
  destroy() {
    this.close();
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('offline', this._onOffline);
      globalThis.removeEventListener('online', this._onOnline);
    }
  }

  // -- connection -------------------------------------------------------------

  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const h of [...set]) {
      try {
        h(arg);
      } catch (e) {
        if (event !== 'error') this._error(e);
      }
    }
  }

  _error(e) {
    if ((this._listeners.get('error')?.size || 0) === 0 && globalThis.console) console.error('fabric:', e);
    this._emit('error', e);
  }

  _setState(patch) {
    const prev = this.state.get();
    const next = { ...prev, ...patch };
    this.state.set(next);
    if (next.status !== prev.status) this._emit('status', next.status);
  }

  _attemptNow() {
    this._retryTimer = null;
    this._connect().catch((e) => this._error(e));
  }

  async _connect() {
    const gen = (this._gen = (this._gen || 0) + 1);
    this._setState({ status: this._everOpened ? 'reconnecting' : 'connecting', retryAt: null });
    if (this.opts.getToken) {
      let token;
      try {
        token = await this.opts.getToken();
      } catch (e) {
        if (gen !== this._gen || this._closing) return;
        this._error(new FabricError('TOKEN_ERROR', 'getToken failed: ' + String(e?.message || e)));
        this._retry();
        return;
      }
      if (gen !== this._gen || this._closing) return;
      this._token = token;
    }
    const useSSE = this._pickSSE();
    const params = { ...(this.opts.params || {}) };
    if (this._token) params[this.opts.tokenParam] = this._token;
    if (useSSE) {
      this._probing = !this._sseRemembered();
      const post = this._sseURL.toString();
      this._start(new SSETransport(this, withParams(this._sseURL, params), post));
    } else {
      this._start(new WSTransport(this, withParams(this._wsURL, params)));
    }
  }

  _start(t) {
    this._transport = t;
    t.start();
  }

  /** Whether the next attempt goes over SSE. */
  _pickSSE() {
    const mode = this.opts.sse;
    if (mode === 'always') return true;
    if (mode === 'never' || !this._fetch) return false;
    if (!this._WebSocket) return true;
    if (this._sseRemembered()) return true;
    if (this._nextSSE) {
      this._nextSSE = false;
      return true;
    }
    return false;
  }

  _storageKey() {
    return 'fabric:transport:' + this._wsURL.origin + this._wsURL.pathname;
  }

  _sseRemembered() {
    if (this._sseUntil && this._sseUntil > Date.now()) return true;
    try {
      const v = JSON.parse(this._storage?.getItem(this._storageKey()) || 'null');
      if (v && v.transport === 'sse' && v.until > Date.now()) {
        this._sseUntil = v.until;
        return true;
      }
    } catch {
      /* no storage */
    }
    return false;
  }

  _rememberSSE() {
    this._sseUntil = Date.now() + this.opts.rememberSSE;
    try {
      this._storage?.setItem(this._storageKey(), JSON.stringify({ transport: 'sse', until: this._sseUntil }));
    } catch {
      /* no storage */
    }
  }

  _opened(t) {
    if (t !== this._transport) return;
    t.openedAt = Date.now();
    const reconnected = this._everOpened;
    this._everOpened = true;
    if (t.kind === 'sse' && this._probing) this._rememberSSE();
    this._probing = false;
    this._setState({ status: 'open', transport: t.kind, retryAt: null, code: null, reason: '', error: null, attempt: this._attempt });
    // Subscriptions first (resuming persistent topics), then queued calls.
    for (const topic of this._topics.values()) if (topic._active) this._sendSubscribe(topic);
    for (const e of this._rpcs.values()) {
      if (!e.sent && this._send(e.frame)) e.sent = true;
    }
    this._refreshDenied = null;
    this._scheduleRefresh(tokenExpiry(this._token));
    this._emit('open', { transport: t.kind, reconnected });
  }

  _closed(t, info) {
    if (t !== this._transport) return;
    this._transport = null;
    clearTimeout(this._refreshTimer);
    const now = Date.now();
    const lived = info.opened ? now - (t.openedAt || now) : 0;
    for (const [id, e] of this._rpcs) {
      if (!e.sent) continue;
      this._rpcs.delete(id);
      clearTimeout(e.timer);
      e.reject(new FabricError('DISCONNECTED', 'the connection dropped before the answer'));
    }
    for (const [ref, w] of this._refreshWaiters) {
      this._refreshWaiters.delete(ref);
      w.reject(new FabricError('DISCONNECTED', 'the connection dropped during a token refresh'));
    }
    this._subRefs.clear();
    for (const topic of this._topics.values()) {
      topic._acked = false;
      topic._resuming = false;
    }
    if (lived >= this.opts.reconnect.stableAfter) this._attempt = 0;
    const code = info.code;
    if (info.opened) this._dropCode = code;
    // Closes this client decided (close(), offline) say nothing about the
    // path; a connect timeout does.
    const ours = info.local === 'client' || info.local === 'offline';
    if (t.kind === 'websocket' && this.opts.sse === 'auto' && !ours) {
      if (!info.opened) {
        // The WebSocket could not be opened: try SSE at once. A server
        // that is down fails both; a path that blocks WebSockets does not.
        this._nextSSE = !this._probedAfterWS;
        this._probedAfterWS = true;
      } else if (code === 1006 && lived < 2000) {
        this._wsQuickFailures++;
        if (this._wsQuickFailures >= this.opts.wsFailuresBeforeSSE) {
          this._wsQuickFailures = 0;
          this._nextSSE = true;
        }
      } else {
        this._wsQuickFailures = 0;
        this._probedAfterWS = false;
      }
    }
    if (t.kind === 'sse') this._probedAfterWS = false;
    const base = { code, reason: info.reason || '' };
    if (this._closing) {
      this._setState({ ...base, status: 'closed', transport: null, retryAt: null });
      this._emit('close', { ...base, reconnect: false });
      return;
    }
    if (info.local === 'offline') {
      this._setState({ ...base, status: 'offline', transport: null, retryAt: null });
      this._emit('close', { ...base, reconnect: false, offline: true });
      return;
    }
    if (code === 4403) return this._stop(base, 'error', new FabricError('FORBIDDEN', info.reason || 'forbidden', { closeCode: code, status: info.status }));
    if (code === 1008) return this._stop(base, 'closed', new FabricError('POLICY', info.reason || 'closed by policy', { closeCode: code }));
    if (code === 4401 && !this.opts.getToken) {
      return this._stop(base, 'error', new FabricError('TOKEN_EXPIRED', 'the token expired and there is no getToken to renew it', { closeCode: code }));
    }
    if (this._nextSSE && !info.opened) {
      // The SSE probe goes at once, and does not count as a retry.
      this._setState({ ...base, transport: null });
      this._emit('close', { ...base, reconnect: true, delay: 0 });
      this._attemptNow();
      return;
    }
    this._retry(info, base);
  }

  /** Schedules the next attempt with backoff. */
  _retry(info = {}, base = {}) {
    let delay = reconnectDelay(this._attempt, this._dropCode, this.opts.reconnect, this._random);
    if (info.retryAfter) delay = Math.max(delay, info.retryAfter);
    this._attempt++;
    const retryAt = Date.now() + delay;
    this._setState({ ...base, status: this._everOpened ? 'reconnecting' : 'connecting', transport: null, attempt: this._attempt, retryAt });
    this._emit('close', { ...base, reconnect: true, delay });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._attemptNow(), delay);
  }

  _stop(base, status, err) {
    this._fatal = err;
    this._setState({ ...base, status, transport: null, retryAt: null, error: err });
    this._emit('close', { ...base, reconnect: false });
    this._failAll(err);
    this._error(err);
  }

  _failAll(err) {
    for (const [id, e] of this._rpcs) {
      this._rpcs.delete(id);
      clearTimeout(e.timer);
      e.reject(err);
    }
  }

  _networkDown() {
    if (this._closing || this._fatal) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._gen = (this._gen || 0) + 1; // a getToken in flight is abandoned
    if (this._transport) this._transport.close(1000, 'offline', 'offline');
    else this._setState({ status: 'offline', transport: null, retryAt: null });
  }

  _networkUp() {
    if (this._closing || this._fatal || this._transport || this.state.get().status !== 'offline') return;
    // Everyone on a network that comes back comes back at once: jitter.
    const delay = Math.floor(this._random() * this.opts.reconnect.base);
    this._setState({ status: this._everOpened ? 'reconnecting' : 'connecting', retryAt: Date.now() + delay });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._attemptNow(), delay);
  }

  _send(obj) {
    const t = this._transport;
    if (!t || !t.opened || t.ended) return false;
    return t.send(JSON.stringify(obj));
  }

  // -- subscriptions ------------------------------------------------------------

  _subscribeTopic(topic) {
    if (this._transport?.opened) this._sendSubscribe(topic);
  }

  _unsubscribeTopic(topic) {
    if (this._transport?.opened) this._send({ type: 'unsubscribe', topic: topic.name });
  }

  _sendSubscribe(topic) {
    clearTimeout(topic._retryTimer);
    const ref = 's' + (++this._seq).toString(36);
    const f = topic._frame(ref);
    this._subRefs.set(ref, topic);
    if (!this._send(f)) this._subRefs.delete(ref);
  }

  _frame(t, m) {
    if (t !== this._transport || !m || typeof m !== 'object') return;
    if (typeof m.type === 'string') {
      this._control(m);
      return;
    }
    if (typeof m.topic !== 'string') return;
    const topic = m.topic;
    if (topic === '__rpc') {
      this._rpcAnswer(m);
      return;
    }
    if (topic.startsWith('__replay:')) {
      if (m.event === 'end' && m.data && typeof m.data === 'object') {
        const tp = this._topics.get(topic.slice(9));
        if (tp && tp._active) tp._end(m.data);
      }
      return;
    }
    const tp = this._topics.get(topic);
    if (tp && tp._active) tp._deliver(m);
    this._emit('message', m);
  }

  _control(m) {
    const ref = typeof m.ref === 'string' ? m.ref : m.ref === undefined ? undefined : JSON.stringify(m.ref);
    switch (m.type) {
      case 'subscribed': {
        const tp = this._subRefs.get(ref);
        this._subRefs.delete(ref);
        if (tp && tp._active) tp._ack();
        return;
      }
      case 'subscribe-denied': {
        const tp = this._subRefs.get(ref) || this._topics.get(m.topic);
        this._subRefs.delete(ref);
        if (!tp || !tp._active) return;
        const reason = m.reason || 'FORBIDDEN';
        if (reason === 'RATE_LIMITED' || reason === 'INTERNAL_ERROR') {
          // Resume limits or a broker hiccup: ask again soon, same position.
          const delay = 1000 + Math.floor(this._random() * 1000);
          tp._retryTimer = setTimeout(() => {
            if (tp._active && this._transport?.opened) this._sendSubscribe(tp);
          }, delay);
          return;
        }
        tp._deny(reason);
        this._emit('denied', { topic: tp.name, reason });
        return;
      }
      case 'refreshed':
      case 'refresh-denied': {
        const w = this._refreshWaiters.get(ref);
        this._refreshWaiters.delete(ref);
        if (w) w.resolve(m);
        return;
      }
      case 'refresh-needed':
        this._refresh().catch(() => {});
        return;
      default:
    }
  }

  _rpcAnswer(m) {
    const answer = (d) => {
      if (!d || typeof d.id !== 'string') return;
      const e = this._rpcs.get(d.id);
      if (!e) return;
      this._rpcs.delete(d.id);
      clearTimeout(e.timer);
      if (d.ok) e.resolve(d.data);
      else e.reject(new FabricError(d.code || 'UNKNOWN', d.error || 'Unknown error', { issues: d.issues, retryAfter: d.retryAfter }));
    };
    if (m.event === '__batch' && Array.isArray(m.data?.batch)) m.data.batch.forEach(answer);
    else answer(m.data);
  }

  // -- tokens ------------------------------------------------------------------

  _scheduleRefresh(exp) {
    clearTimeout(this._refreshTimer);
    if (!this.opts.getToken || typeof exp !== 'number') return;
    const left = exp * 1000 - Date.now();
    let delay = left - this.opts.refreshBefore;
    if (delay < 1000) delay = Math.max(1000, left / 2);
    this._refreshTimer = setTimeout(() => this._refresh().catch(() => {}), delay);
  }

  async _refresh() {
    if (!this.opts.getToken) throw new FabricError('TOKEN_ERROR', 'no getToken option');
    if (this._refreshing) return this._refreshing;
    if (this._refreshDenied) throw this._refreshDenied; // until the next connection
    const run = async () => {
      let token;
      try {
        token = await this.opts.getToken();
      } catch (e) {
        const err = new FabricError('TOKEN_ERROR', 'getToken failed: ' + String(e?.message || e));
        this._error(err);
        throw err;
      }
      const ref = 't' + (++this._seq).toString(36);
      const answer = new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._refreshWaiters.delete(ref);
          reject(new FabricError('TIMEOUT', 'no answer to the token refresh'));
        }, 10000);
        this._refreshWaiters.set(ref, {
          resolve: (v) => (clearTimeout(timer), resolve(v)),
          reject: (e) => (clearTimeout(timer), reject(e)),
        });
      });
      if (!this._send({ type: 'refresh', token, ref })) {
        this._refreshWaiters.get(ref)?.reject(new FabricError('DISCONNECTED', 'not connected'));
        this._token = token; // the next connect uses it (getToken is asked again anyway)
        return answer;
      }
      const m = await answer;
      if (m.type === 'refreshed') {
        this._token = token;
        const exp = typeof m.exp === 'number' && m.exp > 0 ? m.exp : tokenExpiry(token);
        this._scheduleRefresh(exp);
        this._emit('refreshed', { exp });
        return exp;
      }
      // Denied: no retry loop. The server closes with 4401 at expiry, and
      // the reconnect asks getToken again, with backoff.
      const err = new FabricError(m.reason || 'FORBIDDEN', 'token refresh denied: ' + (m.reason || ''));
      this._refreshDenied = err;
      clearTimeout(this._refreshTimer);
      this._error(err);
      throw err;
    };
    this._refreshing = run().finally(() => {
      this._refreshing = null;
    });
    return this._refreshing;
  }
}

function withParams(url, params) {
  const u = new URL(url);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) u.searchParams.set(k, String(v));
  return u.toString();
}

function safeLocalStorage() {
  try {
    return globalThis.localStorage || null;
  } catch {
    return null;
  }
}

/**
 * @typedef {{topic: string, event: string, data: any, seq?: number}} Message
 * @typedef {{topic: string, recovered: boolean, seq: number, epoch: string, replayed: number, error?: string}} ResumeInfo
 * @typedef {{key: string, data: any}} Member
 * @typedef {{history?: boolean, persistent?: boolean, since?: number, epoch?: string, keep?: number}} TopicOptions
 * @typedef {{timeout?: number, offline?: 'queue' | 'fail'}} CallOptions
 * @typedef {object} ClientOptions see fabric.d.ts
 */
