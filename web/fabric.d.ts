// Types of fabric.js, Fabric's browser client (docs/client.md).

/** This file's version. */
export const VERSION: string;

/** A store in Svelte's contract. */
export interface Readable<T> {
  /** Calls run with the value now and on every change; returns the unsubscribe function. */
  subscribe(run: (value: T) => void): () => void;
}

/** A store that can be set (what writable() returns). */
export interface Writable<T> extends Readable<T> {
  get(): T;
  set(value: T): void;
  update(f: (value: T) => T): void;
}

/** A minimal writable store; start runs for the first subscriber, its result when the last leaves. */
export function writable<T>(value: T, start?: (set: (value: T) => void) => void | (() => void)): Writable<T>;

/** One message: the server's envelope. seq is set on persistent topics. */
export interface Message<D = any> {
  topic: string;
  event: string;
  data: D;
  seq?: number;
}

/** What a resume (or the history asked with `history: true`) ended with. */
export interface ResumeInfo {
  topic: string;
  /** false: messages after the position were lost (or another epoch): reload the state. */
  recovered: boolean;
  /** The last sequence the client now has. */
  seq: number;
  /** The history's identity, sent back with the next resume. */
  epoch: string;
  /** Messages delivered by this resume. */
  replayed: number;
  /** A refusal's code (RATE_LIMITED), when the server gave one. */
  error?: string;
}

/** A presence member: its key (one per user) and the user data the server selects. */
export interface Member<D = any> {
  key: string;
  data: D;
}

export type Status = 'connecting' | 'open' | 'reconnecting' | 'offline' | 'closed' | 'error';
export type TransportKind = 'websocket' | 'sse';

/** The connection state. */
export interface State {
  status: Status;
  transport: TransportKind | null;
  /** Reconnect attempts since the last stable connection. */
  attempt: number;
  /** When the next attempt starts (ms since the epoch), while waiting. */
  retryAt: number | null;
  /** The close code of the last connection (4401, 1001, ...). */
  code: number | null;
  reason: string;
  /** Why the client stopped (status "error" or "closed" after 1008). */
  error: FabricError | null;
}

export interface ReconnectOptions {
  /** First backoff window in ms (default 500): retry n waits uniform [0, min(cap, base·2ⁿ)). */
  base?: number;
  /** Largest window in ms (default 30000). */
  cap?: number;
  /** After a 1001 close the first retry waits uniform [0, goingAwaySpread) (default 5000). */
  goingAwaySpread?: number;
  /** A connection open this long (ms) resets the backoff (default 10000). */
  stableAfter?: number;
}

export interface ClientOptions {
  /** The WebSocket URL (default: /ws on the page's host; http(s) URLs are turned into ws(s)). */
  url?: string;
  /** The SSE endpoint (default: /events on the WebSocket URL's host). */
  sseUrl?: string;
  /** A fixed token, sent as ?token= (when there is no getToken). */
  token?: string;
  /** Returns a token: called before every (re)connect and to refresh it. */
  getToken?: () => string | Promise<string>;
  /** The query parameter of the token (default "token"). */
  tokenParam?: string;
  /** More query parameters for the connection URLs. */
  params?: Record<string, string | number | boolean>;
  /** Refresh this many ms before the token's exp (default 30000). */
  refreshBefore?: number;
  /** "auto" (default: SSE when a WebSocket cannot be opened), "never" or "always". */
  sse?: 'auto' | 'never' | 'always';
  /** How long (ms) the choice of SSE is remembered (default 10 minutes, in localStorage). */
  rememberSSE?: number;
  /** WebSockets that open and drop within 2 s this many times in a row switch to SSE (default 3). */
  wsFailuresBeforeSSE?: number;
  /** Bounds one connection attempt in ms (default 15000). */
  connectTimeout?: number;
  /** An SSE stream silent this long (ms) is dropped (default 45000; the server pings every 15 s). */
  sseIdleTimeout?: number;
  /** RPC timeout in ms (default 30000), counted from the call. */
  rpcTimeout?: number;
  /** Calls made while disconnected: "queue" (default) or "fail". */
  offline?: 'queue' | 'fail';
  /** The most queued calls (default 100); the oldest is dropped with QUEUE_FULL. */
  maxQueue?: number;
  reconnect?: ReconnectOptions;
  /** A topic with no listener left is unsubscribed after this many ms (default 100). */
  linger?: number;
  /** Follow the browser's online/offline events (default true). */
  watchNetwork?: boolean;
  /** For tests: the WebSocket class, fetch, storage and random source to use. */
  WebSocket?: any;
  fetch?: typeof fetch;
  storage?: Pick<Storage, 'getItem' | 'setItem'> | null;
  random?: () => number;
}

export interface TopicOptions {
  /** On the first subscribe, ask for the retained history (since 0). */
  history?: boolean;
  /** Resume from 0 after a drop even when no message was seen yet. */
  persistent?: boolean;
  /** Start from this sequence (e.g. one the server rendered the page with). */
  since?: number;
  /** The epoch of since. */
  epoch?: string;
  /** The store's value is the last `keep` messages (default: the last message). */
  keep?: number;
}

export interface CallOptions {
  /** ms, counted from the call (default: the client's rpcTimeout). */
  timeout?: number;
  /** While disconnected: "queue" or "fail" (default: the client's offline). */
  offline?: 'queue' | 'fail';
}

/** An error with a code: the server's (NOT_FOUND, VALIDATION, FORBIDDEN, RATE_LIMITED, ...) or the client's (TIMEOUT, DISCONNECTED, QUEUE_FULL, CONNECTION_CLOSED, TOKEN_EXPIRED, TOKEN_ERROR, POLICY). */
export class FabricError extends Error {
  constructor(code: string, message?: string, details?: { issues?: unknown; retryAfter?: number; topic?: string; status?: number; closeCode?: number });
  code: string;
  issues?: unknown;
  /** ms, with RATE_LIMITED. */
  retryAfter?: number;
  topic?: string;
  status?: number;
  closeCode?: number;
}
export { FabricError as RpcError };

/** A topic: a store of its last message (or last `keep` messages), handlers, resume state. */
export class Topic<D = any> implements Readable<any> {
  readonly name: string;
  subscribe(run: (value: any) => void): () => void;
  /** Every message (of one event); holds the subscription until the returned function is called. */
  on(handler: (msg: Message<D>) => void): () => void;
  on(event: string, handler: (msg: Message<D>) => void): () => void;
  /** After every resume: {recovered, seq, epoch, replayed}. */
  onResume(handler: (info: ResumeInfo) => void): () => void;
  /** Publish (fabric/publish): resolves {seq}. */
  publish(event: string, data?: unknown, opts?: CallOptions): Promise<{ seq: number }>;
  /** Resolves once subscribed on this connection; rejects with the denial. */
  ready(): Promise<void>;
  readonly seq: number;
  readonly epoch: string;
  readonly value: any;
  readonly subscribed: boolean;
}

/** Presence on a topic: a store of its members. */
export class Presence<D = any> implements Readable<Member<D>[]> {
  readonly topic: string;
  subscribe(run: (members: Member<D>[]) => void): () => void;
  readonly members: Member<D>[];
  readonly count: number;
  on(event: 'join' | 'leave', handler: (member: Member<D>) => void): () => void;
  on(event: 'list', handler: (members: Member<D>[]) => void): () => void;
  /** Become a member (subscribes to the topic); returns leave. */
  join(): () => void;
  leave(): void;
}

export interface ClientEvents {
  status: Status;
  open: { transport: TransportKind; reconnected: boolean };
  close: { code?: number; reason: string; reconnect: boolean; delay?: number; offline?: boolean };
  resume: ResumeInfo;
  reload: ResumeInfo;
  denied: { topic: string; reason: string };
  refreshed: { exp?: number };
  error: Error;
  message: Message;
}

export class FabricClient {
  constructor(options?: ClientOptions);
  /** {status, transport, attempt, retryAt, code, reason, error} */
  readonly state: Readable<State> & { get(): State };
  readonly status: Readable<Status> & { get(): Status };
  readonly transport: TransportKind | null;
  /** Messages dropped as duplicates (should stay 0). */
  readonly duplicates: number;
  topic<D = any>(name: string, opts?: TopicOptions): Topic<D>;
  subscribe<D = any>(name: string, handler: (msg: Message<D>) => void, opts?: TopicOptions): () => void;
  presence<D = any>(topic: string): Presence<D>;
  rpc<R = any>(path: string, ...args: unknown[]): Promise<R>;
  call<R = any>(path: string, args?: unknown[], opts?: CallOptions): Promise<R>;
  publish(topic: string, event: string, data?: unknown, opts?: CallOptions): Promise<{ seq: number }>;
  on<K extends keyof ClientEvents>(event: K, handler: (arg: ClientEvents[K]) => void): () => void;
  /** Connect now (after close(), a 1008/4403 close, while waiting or offline). */
  reconnect(): void;
  /** Ask getToken and send the new token now; resolves to its exp. */
  refreshToken(): Promise<number | undefined>;
  close(): void;
  /** close() and remove the online/offline listeners. */
  destroy(): void;
}

export function connect(options?: ClientOptions): FabricClient;
export function connect(url: string, options?: ClientOptions): FabricClient;

export const RECONNECT_DEFAULTS: Readonly<Required<ReconnectOptions>>;
/** The delay before attempt n (0: the first after a drop): full jitter, and the 1001 spread. */
export function reconnectDelay(attempt: number, closeCode?: number, opts?: ReconnectOptions, random?: () => number): number;
/** A JWT's exp (unix seconds), read without verifying; undefined for opaque tokens. */
export function tokenExpiry(token: string | null | undefined): number | undefined;

/** An incremental text/event-stream parser. */
export class SSEParser {
  constructor(onEvent: (ev: { event: string; data: string; id: string | null }) => void);
  push(text: string): void;
}
