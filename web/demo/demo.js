// The demo page of `fabric serve --demo`: a chat, who is online, and a
// live counter, on /fabric.js. Everything the page knows comes from the
// client's stores; nothing here deals with reconnecting or resuming.
import { connect } from '/fabric.js';

const $ = (id) => document.getElementById(id);

// Your name: ?name=, else the one you picked last time, else a random one.
// The demo server takes it from the connection URL for presence (demo
// mode only: it is not authentication).
const params = new URLSearchParams(location.search);
const name = (params.get('name') || localStorage.getItem('fabric-demo-name') || randomName()).slice(0, 32);
localStorage.setItem('fabric-demo-name', name);

const fabric = connect({ params: { name } });
const chat = fabric.topic('demo:chat', { history: true, keep: 200 });
const counter = fabric.topic('demo:counter', { history: true });
const online = fabric.presence('demo:chat');

// -- header -------------------------------------------------------------------

$('me-name').textContent = name;
paintAvatar($('me-avatar'), name);
$('me').onclick = () => {
  const next = prompt('Your name', name);
  if (next && next.trim()) location.search = '?name=' + encodeURIComponent(next.trim());
};
$('new-tab').onclick = () => window.open(location.pathname + '?name=' + encodeURIComponent(randomName()), '_blank');
$('reload-btn').onclick = () => location.reload();

let retryTimer = null;
fabric.state.subscribe((s) => {
  const pill = $('status');
  pill.dataset.status = s.status;
  pill.dataset.transport = s.transport || '';
  clearInterval(retryTimer);
  const text = $('status-text');
  switch (s.status) {
    case 'open':
      text.textContent = 'live · ' + (s.transport === 'sse' ? 'SSE' : 'WebSocket');
      break;
    case 'offline':
      text.textContent = 'offline';
      break;
    case 'error':
    case 'closed':
      text.textContent = s.status + (s.error ? ': ' + s.error.code : '');
      break;
    default: {
      const tick = () => {
        const left = s.retryAt ? s.retryAt - Date.now() : 0;
        text.textContent = left > 100 ? `reconnecting in ${(left / 1000).toFixed(1)} s` : s.status === 'connecting' ? 'connecting…' : 'reconnecting…';
      };
      tick();
      if (s.retryAt) retryTimer = setInterval(tick, 100);
    }
  }
});

// -- activity -------------------------------------------------------------------

const log = [];
function note(text, cls = '') {
  log.push({ at: Date.now(), text, cls });
  const li = document.createElement('li');
  const t = document.createElement('time');
  t.textContent = new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  const span = document.createElement('span');
  span.textContent = text;
  if (cls) span.className = cls;
  li.append(t, span);
  const ol = $('log');
  ol.prepend(li);
  while (ol.children.length > 7) ol.lastChild.remove();
}

fabric.on('open', (e) => note((e.reconnected ? 'reconnected' : 'connected') + ' over ' + (e.transport === 'sse' ? 'SSE' : 'WebSocket'), 'good'));
fabric.on('close', (e) => {
  if (e.offline) note('network offline', 'bad');
  else if (e.code === 1001) note('server going away (1001)', 'bad');
  else if (e.code && e.code !== 1006) note('connection closed (' + e.code + ')', 'bad');
});
let firstResume = true; // the history asked on load is no catching up
const resumes = [];
fabric.on('resume', (r) => {
  resumes.push(r);
  if (r.topic !== 'demo:chat') return;
  if (!firstResume) note(`caught up ${r.replayed} message${r.replayed === 1 ? '' : 's'}` + (r.recovered ? '' : ' (some lost)'), r.recovered ? 'good' : 'bad');
  firstResume = false;
});
fabric.on('reload', (r) => {
  if (r.topic === 'demo:chat') $('reload').hidden = false;
});
fabric.on('denied', (d) => note('subscribe ' + d.topic + ' denied: ' + d.reason, 'bad'));

// -- chat -------------------------------------------------------------------------

const shown = new WeakSet();
const list = $('messages');
const empty = document.createElement('li');
empty.className = 'empty';
empty.textContent = 'No messages yet. Say hi!';
list.append(empty);

chat.subscribe((messages) => {
  let added = false;
  for (const m of messages) {
    if (shown.has(m) || m.event !== 'message') continue;
    shown.add(m);
    list.append(renderMessage(m));
    added = true;
  }
  if (!added) return;
  empty.remove();
  while (list.children.length > 200) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
});

function renderMessage(m) {
  const d = m.data || {};
  const li = document.createElement('li');
  li.dataset.msg = '';
  if (m.seq) li.dataset.seq = String(m.seq);
  if (d.name === name) li.className = 'mine';
  const av = document.createElement('span');
  av.className = 'avatar';
  paintAvatar(av, String(d.name || '?'));
  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  const meta = document.createElement('div');
  meta.className = 'meta';
  const who = document.createElement('b');
  who.textContent = String(d.name || 'someone');
  const when = document.createElement('span');
  when.textContent = d.at ? new Date(d.at).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false }) : '';
  meta.append(who, when);
  const text = document.createElement('div');
  text.className = 'text';
  text.textContent = String(d.text ?? '');
  bubble.append(meta, text);
  li.append(av, bubble);
  return li;
}

$('composer').onsubmit = async (ev) => {
  ev.preventDefault();
  const input = $('text');
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  if (fabric.status.get() !== 'open') toast('Offline: your message is queued and goes out on reconnect');
  try {
    await chat.publish('message', { name, text, at: Date.now() });
  } catch (e) {
    toast('Not sent (' + (e.code || e.message) + '): ' + text);
  }
};

// -- who is online ------------------------------------------------------------------

online.join(); // subscribing to demo:chat already makes us a member; join() says so
online.subscribe((members) => {
  $('online-count').textContent = String(members.length);
  const ul = $('online');
  ul.replaceChildren(
    ...members
      .map((m) => ({ key: m.key, label: memberName(m) }))
      .sort((a, b) => a.label.localeCompare(b.label))
      .map((m) => {
        const li = document.createElement('li');
        li.dataset.member = m.key;
        const av = document.createElement('span');
        av.className = 'avatar';
        paintAvatar(av, m.label);
        const label = document.createElement('span');
        label.textContent = m.label;
        li.append(av, label);
        if (m.label === name) {
          const you = document.createElement('span');
          you.className = 'you';
          you.textContent = '(you)';
          li.append(you);
        }
        const dot = document.createElement('span');
        dot.className = 'dot';
        li.append(dot);
        return li;
      }),
  );
});

// The member's name: its data's name when the server sends user data,
// else its key (the demo's server keys members by name; anonymous
// connections are keyed conn:<instance>:<id>).
function memberName(m) {
  if (m.data && typeof m.data.name === 'string') return m.data.name;
  return m.key.startsWith('conn:') ? 'anonymous' : m.key;
}

// -- counter --------------------------------------------------------------------------

let count = 0;
counter.subscribe((m) => {
  if (!m || typeof m.data?.value !== 'number') return;
  count = m.data.value;
  const el = $('counter');
  el.textContent = String(count);
  el.classList.remove('bump');
  void el.offsetWidth; // restart the animation
  el.classList.add('bump');
});
$('inc').onclick = () => fabric.rpc('demo/increment').catch((e) => toast('+1 failed: ' + (e.code || e.message)));

// -- helpers ----------------------------------------------------------------------------

function paintAvatar(el, who) {
  el.textContent = initials(who);
  el.style.background = `hsl(${hash(who) % 360} 62% 52%)`;
}

function initials(s) {
  const parts = String(s).trim().split(/\s+/).filter(Boolean);
  return ((parts[0]?.[0] || '?') + (parts[1]?.[0] || '')).toUpperCase();
}

function hash(s) {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

function randomName() {
  const a = ['Amber', 'Blue', 'Coral', 'Dusk', 'Ember', 'Fern', 'Golden', 'Hazel', 'Indigo', 'Jade', 'Lunar', 'Misty'];
  const b = ['Otter', 'Falcon', 'Lynx', 'Heron', 'Badger', 'Fox', 'Owl', 'Panda', 'Robin', 'Seal', 'Tiger', 'Wren'];
  return a[Math.floor(Math.random() * a.length)] + ' ' + b[Math.floor(Math.random() * b.length)];
}

let toastTimer;
function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), 3500);
}

// For the browser tests (and the curious): the page's state.
window.fabricDemo = {
  client: fabric,
  name,
  messages: () => [...list.querySelectorAll('[data-msg] .text')].map((e) => e.textContent),
  members: () => online.members.map((m) => ({ key: m.key, data: m.data, name: memberName(m) })),
  counter: () => count,
  resumes,
  log,
};
