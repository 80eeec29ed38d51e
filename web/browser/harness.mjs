// Drives Debian's Chromium (playwright-core, executablePath) through the
// demo page of a live Fabric server; run by web/browser_test.go, which
// starts the servers and answers the harness's requests.
//
// Protocol: one JSON object per line. The harness prints {"step":...}
// results and {"step":"need","id":N,...} requests; the Go test answers each
// request on stdin with {"id":N,...} once it is done (a publish, a server
// restart, ...).
//
//   node harness.mjs '{"base":..., "proxy":..., "tokenBase":..., "chromium":..., "artifacts":...}'
import { chromium } from 'playwright-core';
import readline from 'node:readline';
import path from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

// Requests to the Go test, answered on stdin by id.
const answers = new Map();
let nextID = 0;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const m = JSON.parse(line);
  answers.get(m.id)?.(m);
  answers.delete(m.id);
});
function ask(need) {
  const id = ++nextID;
  return new Promise((resolve) => {
    answers.set(id, resolve);
    out({ step: 'need', id, ...need });
  });
}

const FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const started = Date.now();
const pageErrors = [];
const pages = {};

/** Opens the demo as `name` in its own context (its own storage and network). */
async function openDemo(browser, label, base, name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push({ page: label, error: String(e) }));
  await page.goto(`${base}/?name=${encodeURIComponent(name)}`);
  await page.waitForFunction(() => window.fabricDemo, null, { timeout: 10000 });
  // Record every resume and close the client reports.
  await page.evaluate(() => {
    window.__resumes = [];
    window.__closes = [];
    window.fabricDemo.client.on('resume', (r) => window.__resumes.push(r));
    window.fabricDemo.client.on('close', (c) => window.__closes.push(c.code ?? null));
  });
  pages[label] = { page, context };
  return page;
}

/** Waits until fn (run in the page with arg) is truthy. */
async function until(page, what, fn, arg, timeout = 20000) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (e) {
    const state = await page.evaluate(() => ({
      status: window.fabricDemo?.client.state.get(),
      messages: window.fabricDemo?.messages(),
      members: window.fabricDemo?.members(),
    })).catch(() => null);
    throw new Error(`${what}: ${e.message.split('\n')[0]}; page state: ${JSON.stringify(state)}`);
  }
}

const status = (page) => page.evaluate(() => {
  const s = window.fabricDemo.client.state.get();
  return { status: s.status, transport: s.transport };
});

const untilOpen = (page, what, transport) =>
  until(page, what, (t) => {
    const s = window.fabricDemo.client.state.get();
    return s.status === 'open' && (!t || s.transport === t);
  }, transport);

const untilMessages = (page, what, texts) =>
  until(page, what, (want) => {
    const have = window.fabricDemo.messages();
    return want.every((w) => have.includes(w));
  }, texts);

/** How often each of texts appears on the page, and whether in order. */
const occurrences = (page, texts) =>
  page.evaluate((want) => {
    const have = window.fabricDemo.messages();
    const counts = want.map((w) => have.filter((h) => h === w).length);
    const idx = want.map((w) => have.indexOf(w));
    return { counts, inOrder: idx.every((v, i) => i === 0 || v > idx[i - 1]) };
  }, texts);

async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function main() {
  const browser = await chromium.launch({ executablePath: cfg.chromium, headless: true, args: FLAGS });
  out({ step: 'launched', version: browser.version(), ms: Date.now() - started });

  // The token flow and the README's example run beside the demo flow, on
  // their own servers.
  const token = tokenFlow(browser).catch((e) => out({ step: 'error', where: 'token', error: String(e?.stack || e) }));
  const readme = readmeFlow(browser).catch((e) => out({ step: 'error', where: 'readme', error: String(e?.stack || e) }));

  // 1. Two pages chat; presence shows both, with their user info.
  const a = await openDemo(browser, 'a', cfg.base, 'Alice');
  const b = await openDemo(browser, 'b', cfg.base, 'Bob');
  await untilOpen(a, 'Alice open', 'websocket');
  await untilOpen(b, 'Bob open', 'websocket');
  out({ step: 'open', a: await status(a), b: await status(b) });

  const bothOnline = (names) => {
    const have = window.fabricDemo.members().map((m) => m.name);
    return names.every((n) => have.includes(n));
  };
  await until(a, 'Alice sees Alice and Bob', bothOnline, ['Alice', 'Bob']);
  await until(b, 'Bob sees Alice and Bob', bothOnline, ['Alice', 'Bob']);
  out({
    step: 'presence',
    a: await a.evaluate(() => window.fabricDemo.members()),
    b: await b.evaluate(() => window.fabricDemo.members()),
    aList: await a.$$eval('#online li', (lis) => lis.map((li) => li.textContent.trim())),
  });

  const chat = [
    ['a', 'Hi Bob! Is the new release out?'],
    ['b', 'Yes, I restarted the server a minute ago.'],
    ['a', 'And nobody lost a message?'],
    ['b', 'Not one: every tab caught up by itself.'],
  ];
  for (const [who, text] of chat) {
    const p = who === 'a' ? a : b;
    const other = who === 'a' ? b : a;
    await say(p, text);
    await untilMessages(other, `${who === 'a' ? 'Bob' : 'Alice'} sees "${text}"`, [text]);
  }
  const texts = chat.map(([, t]) => t);
  out({ step: 'chat', a: await occurrences(a, texts), b: await occurrences(b, texts) });

  for (let i = 0; i < 3; i++) await a.click('#inc');
  await until(b, 'Bob sees the counter at 3', () => window.fabricDemo.counter() === 3);
  await until(a, 'Alice sees the counter at 3', () => window.fabricDemo.counter() === 3);
  out({ step: 'counter', a: await a.evaluate(() => window.fabricDemo.counter()), b: await b.evaluate(() => window.fabricDemo.counter()) });

  await until(a, 'the page settles', () => document.querySelectorAll('#messages [data-msg]').length >= 4);
  await a.waitForTimeout(400); // the last animations (appear, bump) end
  const shot = path.join(cfg.artifacts, 'demo.png');
  await a.screenshot({ path: shot });
  out({ step: 'screenshot', path: shot });

  // 2. SSE fallback: the proxy refuses WebSocket upgrades.
  const c = await openDemo(browser, 'c', cfg.proxy, 'Carol');
  await untilOpen(c, 'Carol open over SSE', 'sse');
  await until(a, 'Alice sees Carol', bothOnline, ['Carol']);
  await say(c, 'Carol here, over SSE.');
  await untilMessages(a, 'Alice sees Carol\'s message', ['Carol here, over SSE.']);
  await say(a, 'Welcome, Carol!');
  await untilMessages(c, 'Carol sees Alice\'s message', ['Welcome, Carol!']);
  out({
    step: 'sse',
    c: await status(c),
    remembered: await c.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('fabric:transport:'))),
    cSees: await occurrences(c, ['Welcome, Carol!']),
    aSees: await occurrences(a, ['Carol here, over SSE.']),
  });

  // 3. The network of two pages is cut (Bob on a WebSocket, Carol on
  // SSE); messages are published meanwhile; they come back.
  for (const label of ['b', 'c']) await pages[label].context.setOffline(true);
  await until(b, 'Bob offline', () => window.fabricDemo.client.state.get().status === 'offline');
  await until(c, 'Carol offline', () => window.fabricDemo.client.state.get().status === 'offline');
  const cut = [1, 2, 3, 4, 5].map((n) => `Sent while Bob and Carol were offline (${n}/5)`);
  await ask({ need: 'publish', texts: cut });
  for (const label of ['b', 'c']) await pages[label].context.setOffline(false);
  await untilMessages(b, 'Bob catches up after the cut', cut);
  await untilMessages(c, 'Carol catches up after the cut', cut);
  await untilOpen(b, 'Bob open again', 'websocket');
  await untilOpen(c, 'Carol open again', 'sse');
  out({
    step: 'cut',
    a: await occurrences(a, cut),
    b: await occurrences(b, cut),
    c: await occurrences(c, cut),
    bResumes: await b.evaluate(() => window.__resumes.filter((r) => r.topic === 'demo:chat')),
    cResumes: await c.evaluate(() => window.__resumes.filter((r) => r.topic === 'demo:chat')),
  });

  // 4. The server restarts; messages are published on the new server
  // before any page can reconnect (the Go test holds connections until
  // they are published).
  const restart = [1, 2, 3].map((n) => `Published right after the server restarted (${n}/3)`);
  const r1 = Date.now();
  await ask({ need: 'restart', gate: true, texts: restart });
  for (const [label, p] of Object.entries({ a, b, c })) await untilMessages(p, `${label} catches up after the restart`, restart);
  for (const [label, p] of Object.entries({ a, b })) await untilOpen(p, `${label} open after the restart`, 'websocket');
  await untilOpen(c, 'c open after the restart', 'sse');
  out({
    step: 'restart',
    ms: Date.now() - r1,
    a: await occurrences(a, restart),
    b: await occurrences(b, restart),
    c: await occurrences(c, restart),
    closes: {
      a: await a.evaluate(() => window.__closes),
      b: await b.evaluate(() => window.__closes),
      c: await c.evaluate(() => window.__closes),
    },
    resumes: await a.evaluate(() => window.__resumes.filter((r) => r.topic === 'demo:chat').slice(-1)),
  });

  // 5. Both at once: Bob's network is cut, the server restarts, messages
  // are published while Bob is away, his network comes back.
  await b.context().setOffline(true);
  await until(b, 'Bob offline again', () => window.fabricDemo.client.state.get().status === 'offline');
  const away = [1, 2].map((n) => `Published while Bob was cut off and the server restarted (${n}/2)`);
  await ask({ need: 'restart', gate: false, texts: away });
  await b.context().setOffline(false);
  await untilMessages(b, 'Bob catches up after cut + restart', away);
  await untilMessages(a, 'Alice gets the messages too', away);
  await untilMessages(c, 'Carol gets the messages too', away);
  for (const [label, p] of Object.entries({ a, b })) await untilOpen(p, `${label} open after cut + restart`, 'websocket');
  await untilOpen(c, 'c open after cut + restart', 'sse');
  out({ step: 'restart-cut', a: await occurrences(a, away), b: await occurrences(b, away), c: await occurrences(c, away) });

  // Everything each page shows, once each: no duplicate anywhere.
  const all = [...texts, 'Carol here, over SSE.', 'Welcome, Carol!', ...cut, ...restart, ...away];
  const final = {};
  for (const [label, p] of Object.entries({ a, b, c })) {
    final[label] = {
      occurrences: await occurrences(p, label === 'c' ? all.slice(4) : all),
      duplicates: await p.evaluate(() => window.fabricDemo.client.duplicates),
      reloadBanner: await p.isVisible('#reload'),
      status: await status(p),
    };
  }
  out({ step: 'final', pages: final });
  const end = path.join(cfg.artifacts, 'demo-after-restarts.png');
  await a.waitForTimeout(400);
  await a.screenshot({ path: end });
  out({ step: 'screenshot-final', path: end });

  await token;
  await readme;
  out({ step: 'pageErrors', errors: pageErrors });
  await browser.close();
  out({ step: 'done', ms: Date.now() - started });
}

// The token flow: a page whose getToken fetches tokens from the server;
// the server asks for a refresh before expiry, takes one, denies the
// next, closes with 4401 at expiry; the client gets a new token and
// reconnects.
async function tokenFlow(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push({ page: 'token', error: String(e) }));
  await page.goto(cfg.tokenBase + '/token.html');
  await until(page, 'token page open', () => window.client?.status.get() === 'open');
  await until(page, 'a refresh', () => window.events.some((e) => e.type === 'refreshed'), null, 15000);
  await ask({ need: 'deny-refresh' });
  await until(page, '4401 then a new connection', () => {
    const i = window.events.findIndex((e) => e.type === 'close' && e.code === 4401);
    return i >= 0 && window.events.slice(i).some((e) => e.type === 'open' && e.reconnected);
  }, null, 15000);
  out({ step: 'token', events: await page.evaluate(() => window.events) });
  await context.close();
}

// The README's example page, as written: it connects, and what is typed
// comes back through the server.
async function readmeFlow(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push({ page: 'readme', error: String(e) }));
  await page.goto(cfg.readmeBase + '/readme.html');
  await page.waitForFunction(() => document.title === 'open', null, { timeout: 15000 });
  await page.fill('#text', 'Hello from the README');
  await page.press('#text', 'Enter');
  await page.waitForFunction(() => [...document.querySelectorAll('#log li')].some((li) => li.textContent === 'Hello from the README'), null, { timeout: 15000 });
  out({ step: 'readme', title: await page.title(), items: await page.$$eval('#log li', (lis) => lis.map((li) => li.textContent)) });
  await context.close();
}

main().then(
  () => process.exit(0),
  (e) => {
    out({ step: 'error', error: String(e?.stack || e) });
    process.exit(1);
  },
);
