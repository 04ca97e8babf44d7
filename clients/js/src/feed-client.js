// feed-client: a dependency-free client for the gateway's live feed
// (WebSocket, with a Server-Sent Events fallback). Works in browsers and in
// Node 20 (pass `WebSocket` there: Node 20 has none without a flag).
// See README.md beside this file.

/** First reconnect delay; each failed attempt doubles it up to the cap. */
export const BACKOFF_INITIAL_MS = 500;
/** Longest wait between attempts: a gateway back after an outage is found within this. */
export const BACKOFF_MAX_MS = 30_000;
/** Growth of the delay per failed attempt. */
export const BACKOFF_FACTOR = 2;
/**
 * Each delay is drawn from [delay * (1 - JITTER), delay], so the devices a
 * restarted node dropped do not all come back in the same millisecond.
 */
export const JITTER = 0.5;
/** A connection open this long (or that delivered an event) resets the backoff. */
export const STABLE_AFTER_MS = 5_000;
/** The gateway's default GATEWAY_PING_INTERVAL; pass `pingIntervalMs` if yours differs. */
export const DEFAULT_PING_INTERVAL_MS = 20_000;
/** Silence for this many ping intervals means the connection is dead (the gateway's own rule). */
export const DEAD_AFTER_INTERVALS = 2;
/** How long the reachability probe of a silent browser connection may take. */
export const PROBE_TIMEOUT_MS = 3_000;
/**
 * Event ids remembered for dropping duplicates. The gateway replays at most
 * its feed cache (1,000 posts), so an older duplicate cannot come back.
 */
export const SEEN_IDS_MAX = 1_000;
/** WebSocket attempts in a row that never opened, at a node that answered HTTP, before the client tries SSE (with the backoff, about 7 s: longer than a node takes to start and join). */
export const WS_FAILURES_BEFORE_SSE = 4;
/** 4001 moves followed at once in a row; beyond that the backoff applies (a ring in flux). */
export const MAX_IMMEDIATE_MOVES = 3;
/**
 * Failed attempts at the node a 4001 named before going back to the entry URL.
 * A node that has just joined asks for a retry (503) until every peer routes
 * its users to it (a fraction of a second), so one failure there is not a reason
 * to give up on it.
 */
export const MOVED_RETRIES = 3;

/** The gateway's WebSocket close codes the client acts on (SPEC "Close codes"). */
export const CLOSE = Object.freeze({ NORMAL: 1000, GOING_AWAY: 1001, POLICY: 1008, UNAVAILABLE: 1011, MOVED: 4001, SLOW: 4008, TOO_MANY_DEVICES: 4029 });

const FEED_PATH = '/post/feed/posted';

/**
 * A live feed subscription.
 *
 *   const feed = new FeedClient({ url: 'ws://127.0.0.1:8084', token: () => myToken,
 *     onEvent: (e) => show(e.data), onState: (s, d) => label(s, d) });
 *   feed.start();
 *
 * Options:
 * - `url`: the gateway (`ws://` or `wss://`; a URL without a path gets `/post/feed/posted`).
 * - `token`: a string, or a function returning the token (or a promise of it). It is
 *   called before every connection, so the page can hand over a fresh token.
 * - `since`: the newest event id the caller already has (e.g. the top of `GET /post/feed`).
 * - `seen`: ids the caller already shows (not delivered again).
 * - `onEvent(event)`: each new post event `{type:'post', id, ts, data}`, once per id.
 * - `onControl(message)`: other messages (e.g. `{type:'recovery_cut', ...}`).
 * - `onState(state, detail)`: `connecting` | `live` | `reconnecting` | `closed`;
 *   detail `{transport, recovered, code, reason, delayMs}`. While `live`, `recovered`
 *   counts the events this connection replayed (published before it opened).
 * - `transport`: `auto` (WebSocket, SSE when it keeps failing), `websocket` or `sse`.
 * - `WebSocket`, `EventSource`, `fetch`: constructors/functions (default: the globals).
 * - `pingIntervalMs`: the gateway's ping interval.
 */
export class FeedClient {
  constructor(options) {
    if (!options || !options.url) throw new TypeError('FeedClient: `url` is required');
    this.options = options;
    this.baseUrl = options.url;
    this.url = options.url; // where the next attempt goes (a 4001 changes it)
    this.lastEventId = options.since || null;
    this.transport = options.transport || 'auto';
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.EventSource = options.EventSource || globalThis.EventSource;
    this.fetch = options.fetch || globalThis.fetch?.bind(globalThis);
    this.pingIntervalMs = options.pingIntervalMs || DEFAULT_PING_INTERVAL_MS;
    this.seen = new Map(); // id -> true, insertion order = age
    for (const id of options.seen || []) this.#remember(id);
    this.attempt = 0;
    this.wsFailures = 0;
    this.moves = 0;
    this.movedFailures = 0;
    this.state = 'idle';
    this.stopped = true;
    this.conn = null;
    this.timers = new Set();
  }

  /** Connects (and keeps reconnecting until `close()`). */
  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.#connect();
  }

  /** Closes for good. */
  close() {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.#drop();
    this.#setState('closed', {});
  }

  /** Which transport the current or next connection uses. */
  get currentTransport() {
    if (this.transport === 'sse') return 'sse';
    if (this.transport === 'websocket') return 'websocket';
    if (!this.WebSocket) return 'sse';
    return this.wsFailures >= WS_FAILURES_BEFORE_SSE && this.EventSource ? 'sse' : 'websocket';
  }

  #setState(state, detail) {
    this.state = state;
    this.options.onState?.(state, { transport: this.currentTransport, ...detail });
  }

  #later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  #remember(id) {
    this.seen.set(id, true);
    if (this.seen.size > SEEN_IDS_MAX) this.seen.delete(this.seen.keys().next().value);
  }

  async #token() {
    const t = this.options.token;
    return typeof t === 'function' ? await t() : t;
  }

  async #connect() {
    if (this.stopped) return;
    const transport = this.currentTransport;
    this.#setState(this.attempt === 0 && !this.everOpened ? 'connecting' : 'reconnecting', {});
    let token;
    try {
      token = await this.#token();
    } catch (e) {
      this.#retry({ reason: `token: ${e.message}` });
      return;
    }
    if (this.stopped) return;
    const url = endpoint(this.url, transport, token, this.lastEventId);
    const conn = { transport, opened: false, openedAt: 0, recovered: 0, closed: false, watchdog: null, socket: null };
    this.conn = conn;
    if (transport === 'websocket') this.#openWebSocket(conn, url);
    else this.#openEventSource(conn, url);
  }

  #openWebSocket(conn, url) {
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (e) {
      this.wsFailures++;
      this.#ended(conn, { code: 1006, reason: e.message });
      return;
    }
    conn.socket = ws;
    ws.addEventListener('open', () => this.#opened(conn));
    // A failed handshake (401, 502, refused) is an error, then a close:
    // the close decides. (Node's `ws` throws an error nobody listens to.)
    ws.addEventListener('error', () => {});
    ws.addEventListener('message', (m) => {
      this.#alive(conn);
      if (typeof m.data !== 'string') return; // the gateway sends text frames only
      this.#message(conn, m.data, null);
    });
    ws.addEventListener('close', async (c) => {
      // Only a node that answers HTTP but never completes the upgrade counts
      // toward the SSE fallback: a node that is down (restarting) is not a
      // WebSocket problem, and SSE, once taken, is kept.
      if (!conn.opened && (await this.#reachable())) this.wsFailures++;
      this.#ended(conn, { code: c.code, reason: c.reason });
    });
    // Node's `ws` shows the gateway's pings; a browser never does (see #arm).
    if (typeof ws.on === 'function') {
      conn.pingsVisible = true;
      ws.on('ping', () => this.#alive(conn));
    }
  }

  #openEventSource(conn, url) {
    let es;
    try {
      es = new this.EventSource(url);
    } catch (e) {
      this.#ended(conn, { code: 1006, reason: e.message });
      return;
    }
    conn.socket = es;
    es.addEventListener('open', () => this.#opened(conn));
    es.addEventListener('message', (m) => {
      this.#alive(conn);
      this.#message(conn, m.data, m.lastEventId || null);
    });
    // The gateway's close, with the WebSocket close code and reason.
    es.addEventListener('close', (m) => {
      let c = { code: 1006, reason: 'bad close event' };
      try {
        c = JSON.parse(m.data);
      } catch {}
      this.#ended(conn, { code: c.code, reason: c.reason || '' });
    });
    for (const type of ['recovery_cut']) {
      es.addEventListener(type, (m) => {
        this.#alive(conn);
        try {
          this.options.onControl?.({ type, ...JSON.parse(m.data) });
        } catch {}
      });
    }
    // EventSource would reconnect by itself (sending Last-Event-ID), but with
    // the old URL: the old token and no 4001 move. This client reconnects
    // itself instead, with a fresh token and `since`.
    es.addEventListener('error', () => this.#ended(conn, { code: 1006, reason: 'event stream error' }));
  }

  #opened(conn) {
    if (conn !== this.conn) return;
    conn.opened = true;
    conn.openedAt = Date.now();
    this.everOpened = true;
    // Only a WebSocket that opened clears the count: once on SSE, the client
    // stays there (a proxy that broke the upgrade will break it again).
    if (conn.transport === 'websocket') this.wsFailures = 0;
    this.movedFailures = 0;
    this.#later(STABLE_AFTER_MS, () => {
      if (this.conn === conn && !conn.closed) this.#stable();
    });
    this.#alive(conn);
    this.#setState('live', { recovered: 0 });
  }

  #stable() {
    this.attempt = 0;
    this.moves = 0;
  }

  #message(conn, text, sseId) {
    if (conn !== this.conn) return;
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return; // not ours to judge; the gateway sends JSON only
    }
    if (!msg || typeof msg !== 'object') return;
    if (msg.type !== 'post') {
      this.options.onControl?.(msg);
      return;
    }
    const id = msg.id ?? sseId;
    if (typeof id !== 'string') return;
    this.#stable();
    if (this.seen.has(id)) return; // a duplicate: at-least-once delivery
    this.#remember(id);
    this.lastEventId = id;
    // Published before this connection opened: a replay of what was missed.
    if (typeof msg.ts === 'number' && msg.ts < conn.openedAt) {
      conn.recovered++;
      this.#setState('live', { recovered: conn.recovered });
    }
    this.options.onEvent?.(msg);
  }

  /** Something arrived: the connection is alive; re-arm the watchdog. */
  #alive(conn) {
    if (conn !== this.conn || conn.closed) return;
    clearTimeout(conn.watchdog);
    this.timers.delete(conn.watchdog);
    conn.watchdog = this.#later(DEAD_AFTER_INTERVALS * this.pingIntervalMs, () => this.#silent(conn));
  }

  /** Whether the node of `this.url` answers `/healthz` (true when it cannot be asked). */
  async #reachable() {
    if (!this.fetch) return true;
    const ctl = new AbortController();
    const t = this.#later(PROBE_TIMEOUT_MS, () => ctl.abort());
    try {
      await this.fetch(healthUrl(this.url), { mode: 'no-cors', cache: 'no-store', signal: ctl.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(t);
    }
  }

  /**
   * Silent for two ping intervals. Where pings are visible (Node `ws`) the
   * connection is dead. A browser page sees no pings, so a quiet feed is
   * silent too: there the client asks the node's `/healthz`, and only a
   * node that does not answer (hung, unreachable) ends the connection.
   */
  async #silent(conn) {
    if (conn !== this.conn || conn.closed) return;
    if (!conn.pingsVisible && this.fetch) {
      const ctl = new AbortController();
      const t = this.#later(PROBE_TIMEOUT_MS, () => ctl.abort());
      let reachable = false;
      try {
        // `no-cors`: the gateway sends no CORS headers for /healthz; an opaque
        // answer still proves the node answers.
        await this.fetch(healthUrl(this.url), { mode: 'no-cors', cache: 'no-store', signal: ctl.signal });
        reachable = true;
      } catch {}
      clearTimeout(t);
      this.timers.delete(t);
      if (conn !== this.conn || conn.closed) return;
      if (reachable) {
        this.#alive(conn);
        return;
      }
    }
    this.#ended(conn, { code: 1006, reason: 'no pings: connection dead' });
  }

  #drop() {
    const conn = this.conn;
    if (!conn) return;
    conn.closed = true;
    clearTimeout(conn.watchdog);
    try {
      conn.socket?.close();
    } catch {}
  }

  #ended(conn, { code, reason }) {
    if (conn !== this.conn || conn.closed) return;
    this.#drop();
    this.conn = null;
    if (this.stopped) return;
    if (code === CLOSE.MOVED && reason && this.moves < MAX_IMMEDIATE_MOVES) {
      // The user's slot moved to another node: go there now, with `since`.
      this.moves++;
      this.url = reason;
      this.#setState('reconnecting', { code, reason, delayMs: 0 });
      this.#connect();
      return;
    }
    if (code === CLOSE.MOVED && reason) this.url = reason;
    else if (!conn.opened && this.url !== this.baseUrl && this.movedFailures < MOVED_RETRIES) {
      this.movedFailures++; // the node a 4001 named may still be joining: retry it
    } else if (code !== CLOSE.MOVED) this.url = this.baseUrl; // any node proxies to the owner
    this.#retry({ code, reason });
  }

  #retry(detail) {
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * BACKOFF_FACTOR ** this.attempt);
    const delayMs = Math.round(delay * (1 - JITTER * Math.random()));
    this.attempt++;
    this.#setState('reconnecting', { ...detail, delayMs });
    this.#later(delayMs, () => this.#connect());
  }
}

/** The URL of one attempt: the feed path, `token`, and `since` when known. */
export function endpoint(base, transport, token, since) {
  const u = new URL(base);
  if (u.pathname === '' || u.pathname === '/') u.pathname = FEED_PATH;
  if (transport === 'sse') u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  if (token) u.searchParams.set('token', token);
  if (since) u.searchParams.set('since', since);
  else u.searchParams.delete('since');
  return u.toString();
}

function healthUrl(base) {
  const u = new URL(base);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.pathname = '/healthz';
  u.search = '';
  return u.toString();
}
