// The demo page: the OTUS API on this origin, the live feed from the
// gateway through the feed client. `?transport=sse` (or `websocket`)
// forces a transport; by default the client picks (WebSocket, SSE when
// WebSocket keeps failing or is missing).
import { FeedClient } from '/feed-client.js';

/** Posts the feed shows at first (the API's page size). */
const FEED_PAGE = 20;
/** Author names remembered; beyond this the oldest is looked up again. */
const NAMES_MAX = 500;
/** Posts kept on the page; older ones fall off the bottom. */
const FEED_MAX = 200;
const TOKEN_KEY = 'feed.session';

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
let session = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || 'null'); // {id, token}
let client = null;
const names = new Map();

async function api(method, path, body) {
  const headers = {};
  if (session) headers.authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (resp.status === 401 && session) signOut('Your session ended: log in again.');
  if (!resp.ok) throw new Error(data?.message || `${method} ${path}: ${resp.status}`);
  return data;
}

function showError(e) {
  $('#error').textContent = e ? e.message || String(e) : '';
  $('#error').hidden = !e;
}

/** Runs a form's action, showing its error instead of losing it. */
function onSubmit(sel, action) {
  $(sel).addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const button = form.querySelector('button');
    button.disabled = true;
    try {
      showError(null);
      await action(Object.fromEntries(new FormData(form)), form);
    } catch (e) {
      showError(e);
    } finally {
      button.disabled = false;
    }
  });
}

async function nameOf(id) {
  if (names.has(id)) return names.get(id);
  let name = id;
  try {
    const u = await api('GET', `/user/get/${encodeURIComponent(id)}`);
    name = `${u.first_name} ${u.second_name}`;
  } catch {}
  names.set(id, name);
  if (names.size > NAMES_MAX) names.delete(names.keys().next().value);
  return name;
}

/** One post in the feed, once: `top` for live ones (newest first). */
async function showPost({ id, text, author_user_id }, top, fresh) {
  const feed = $('#feed');
  if (feed.querySelector(`li[data-id="${CSS.escape(id)}"]`)) return;
  const li = document.createElement('li');
  li.dataset.id = id;
  if (fresh) li.className = 'new';
  const author = document.createElement('div');
  author.className = 'author';
  author.textContent = author_user_id;
  const body = document.createElement('div');
  body.className = 'text';
  body.textContent = text;
  li.append(author, body);
  if (top) feed.prepend(li);
  else feed.append(li);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  $('#feed-empty').hidden = true;
  author.textContent = await nameOf(author_user_id);
}

/** The last states, for whoever debugs the page (and its tests). */
const STATES_KEPT = 50;
window.feedStates = [];

function showState(state, detail) {
  window.feedStates.push({ state, ...detail });
  if (window.feedStates.length > STATES_KEPT) window.feedStates.shift();
  const conn = $('#conn');
  conn.dataset.state = state;
  conn.dataset.transport = detail.transport || '';
  const via = detail.transport === 'sse' ? ' (SSE)' : '';
  let label = state;
  if (state === 'live' && detail.recovered > 0) label = `live · recovered ${detail.recovered} post${detail.recovered === 1 ? '' : 's'}`;
  if (state === 'reconnecting' && detail.delayMs > 0) label = `reconnecting in ${(detail.delayMs / 1000).toFixed(1)} s`;
  conn.textContent = label + via;
}

async function signIn(id, token) {
  session = { id, token };
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify(session));
  $('#signed-out').hidden = true;
  $('#signed-in').hidden = false;
  $('#logout').hidden = false;
  $('#me').textContent = id;
  nameOf(id).then((n) => ($('#me').textContent = `${n} · ${id}`));
  await startFeed();
}

function signOut(message) {
  client?.close();
  client = null;
  session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('#feed').replaceChildren();
  $('#signed-out').hidden = false;
  $('#signed-in').hidden = true;
  $('#logout').hidden = true;
  $('#me').textContent = '';
  showState('offline', {});
  showError(message ? new Error(message) : null);
}

/** Seconds until the token's `exp` (negative once expired). */
function tokenSecondsLeft(token) {
  try {
    const claims = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
    return claims.exp - Date.now() / 1000;
  } catch {
    return -1;
  }
}

async function startFeed() {
  const posts = await api('GET', `/post/feed?offset=0&limit=${FEED_PAGE}`);
  $('#feed').replaceChildren();
  for (const p of posts) showPost(p, false, false);
  $('#feed-empty').hidden = posts.length > 0;
  const { gateway_url, ping_interval_ms } = await (await fetch('/config.json')).json();
  client = new FeedClient({
    url: gateway_url,
    pingIntervalMs: ping_interval_ms,
    // The page shows the feed up to posts[0]: the gateway replays what
    // came after it, and the client drops what the page already has.
    since: posts[0]?.id,
    seen: posts.map((p) => p.id),
    transport: params.get('transport') || 'auto',
    // Asked before every connection. This page has no refresh endpoint to
    // call, so an expired token ends the session; a page that has one
    // fetches a fresh token here.
    token: () => {
      if (!session || tokenSecondsLeft(session.token) <= 0) {
        signOut('Your session ended: log in again.');
        throw new Error('no session');
      }
      return session.token;
    },
    onEvent: (e) => showPost({ id: e.data.postId, text: e.data.postText, author_user_id: e.data.author_user_id }, true, true),
    onState: showState,
  });
  client.start();
}

onSubmit('#login-form', async ({ id, password }) => {
  const { token } = await api('POST', '/login', { id, password });
  await signIn(id, token);
});

onSubmit('#register-form', async (f) => {
  const { user_id } = await api('POST', '/user/register', { ...f, biography: '' });
  const { token } = await api('POST', '/login', { id: user_id, password: f.password });
  await signIn(user_id, token);
});

onSubmit('#post-form', async ({ text }, form) => {
  await api('POST', '/post/create', { text });
  form.reset();
});

onSubmit('#search-form', async ({ first_name, last_name }) => {
  const q = new URLSearchParams({ first_name, last_name });
  const users = await api('GET', `/user/search?${q}`);
  const list = $('#people');
  list.replaceChildren();
  for (const u of users) {
    if (u.id === session.id) continue;
    const li = document.createElement('li');
    li.dataset.id = u.id;
    const who = document.createElement('span');
    who.textContent = `${u.first_name} ${u.second_name}`;
    who.title = u.id;
    const follow = document.createElement('button');
    follow.textContent = 'Follow';
    follow.addEventListener('click', async () => {
      try {
        showError(null);
        await api('PUT', `/friend/set/${encodeURIComponent(u.id)}`);
        follow.textContent = 'Following';
        follow.disabled = true;
      } catch (e) {
        showError(e);
      }
    });
    li.append(who, follow);
    list.append(li);
  }
  if (!users.length) list.textContent = 'No one found.';
});

$('#logout').addEventListener('click', () => signOut());

if (session) signIn(session.id, session.token).catch(showError);
