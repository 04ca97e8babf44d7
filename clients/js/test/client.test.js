// The client against a real gateway and backend (see stack.js): events
// come from real posts through RabbitMQ, restarts are real processes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { FeedClient, CLOSE } from '../src/feed-client.js';
import { startStack, mintToken, waitFor, unique, PING_INTERVAL_MS } from './stack.js';

let stack;
before(async () => {
  stack = await startStack();
});
after(async () => {
  await stack?.stop();
});

/** A client of `user` recording what it sees. */
function watch(user, options = {}) {
  const seen = { events: [], states: [], controls: [] };
  const client = new FeedClient({
    url: stack.gw.url,
    token: user.token,
    WebSocket,
    pingIntervalMs: PING_INTERVAL_MS,
    onEvent: (e) => seen.events.push(e),
    onState: (s, d) => seen.states.push({ s, ...d }),
    onControl: (m) => seen.controls.push(m),
    ...options,
  });
  seen.client = client;
  seen.ids = () => seen.events.map((e) => e.id);
  seen.live = () => client.state === 'live';
  client.start();
  return seen;
}

/** Alice and a follower Bob, registered through the backend. */
async function pair() {
  const alice = await stack.backend.user('Alice');
  const bob = await stack.backend.user('Bob');
  await stack.backend.follow(bob, alice);
  return { alice, bob };
}

test('receives a post as it is published, and state goes live', async () => {
  const { alice, bob } = await pair();
  const w = watch(bob);
  await waitFor('live', w.live);
  const id = await stack.backend.post(alice, 'hello');
  await waitFor('the post', () => w.ids().includes(id));
  const e = w.events.find((x) => x.id === id);
  assert.equal(e.type, 'post');
  assert.equal(e.data.postText, 'hello');
  assert.equal(e.data.author_user_id, alice.id);
  assert.equal(w.client.lastEventId, id);
  assert.equal(w.states[0].s, 'connecting');
  w.client.close();
});

test('drops a duplicate: the same event replayed by `since` is delivered once', async () => {
  const { alice, bob } = await pair();
  const first = await stack.backend.post(alice, 'one');
  const second = await stack.backend.post(alice, 'two');
  await waitFor('both in the feed cache', async () => {
    const feed = await stack.backend.call('GET', '/post/feed?offset=0&limit=10', { token: bob.token });
    return feed.length === 2;
  });
  // Ids are compared as strings and every UUIDv7 is > '0': a replay of the
  // whole feed (first and second); the client was told it shows `first` already.
  const w = watch(bob, { since: '0', seen: [first] });
  await waitFor('the replay', () => w.ids().includes(second));
  assert.deepEqual(w.ids(), [second]);
  // The same connection, reconnected with an old `since`: both come again and neither is passed on.
  w.client.lastEventId = '0';
  w.client.conn.socket.close(4000);
  await waitFor('reconnected', () => w.states.filter((s) => s.s === 'live').length >= 2);
  const third = await stack.backend.post(alice, 'three');
  await waitFor('the third', () => w.ids().includes(third));
  assert.deepEqual(w.ids(), [second, third]);
  w.client.close();
});

test('resumes with `since` after its gateway is restarted: each post once, counted as recovered', async () => {
  const { alice, bob } = await pair();
  const w = watch(bob);
  await waitFor('live', w.live);
  const before = await stack.backend.post(alice, 'before');
  await waitFor('first post', () => w.ids().includes(before));
  const { port, id } = stack.gw;
  await stack.gw.stop();
  await waitFor('reconnecting', () => w.client.state === 'reconnecting');
  const missed = [await stack.backend.post(alice, 'missed 1'), await stack.backend.post(alice, 'missed 2')];
  // Fanned out (into Bob's feed cache) before the node is back: what it
  // replays is then the whole gap.
  await waitFor('missed posts in the feed cache', async () => {
    const feed = await stack.backend.call('GET', '/post/feed?offset=0&limit=10', { token: bob.token });
    return missed.every((m) => feed.some((p) => p.id === m));
  });
  stack.gw = await stack.gateway(port, id);
  await waitFor('both missed posts', () => missed.every((m) => w.ids().includes(m)));
  assert.deepEqual(w.ids(), [before, ...missed], 'each post once, in order');
  assert.ok(w.states.some((s) => s.s === 'reconnecting' && s.code === CLOSE.GOING_AWAY), 'the node said 1001');
  assert.ok(w.states.some((s) => s.s === 'live' && s.recovered === 2), 'two posts counted as recovered');
  w.client.close();
});

test('follows a 4001 close to the new owner named in its reason', async () => {
  // Several users on the first node; a second node takes about half the slots,
  // so some of them are moved (all staying put has odds of 1 in 4,096).
  const alice = await stack.backend.user('Alice');
  const bobs = [];
  for (let i = 0; i < 12; i++) {
    const bob = await stack.backend.user('Bob');
    await stack.backend.follow(bob, alice);
    bobs.push(watch(bob));
  }
  await waitFor('all live', () => bobs.every((w) => w.live()));
  const second = await stack.gateway();
  try {
    await waitFor('a 4001 move', () => bobs.some((w) => w.states.some((s) => s.code === CLOSE.MOVED)));
    const moved = bobs.filter((w) => w.states.some((s) => s.code === CLOSE.MOVED));
    for (const w of moved) {
      const move = w.states.find((s) => s.code === CLOSE.MOVED);
      assert.equal(move.reason, second.url, 'the reason is the new owner');
      assert.equal(move.delayMs, 0, 'followed at once');
    }
    await waitFor('moved ones live on the new node', () => moved.every((w) => w.live() && w.client.url === second.url));
    const id = await stack.backend.post(alice, 'after the move');
    await waitFor('every Bob gets it once', () => bobs.every((w) => w.ids().filter((x) => x === id).length === 1));
  } finally {
    for (const w of bobs) w.client.close();
    await second.stop();
  }
});

test('asks for a fresh token: a refused one, then one that expires while connected', async () => {
  const { alice, bob } = await pair();
  const expired = mintToken(bob.id, { iat: Math.floor(Date.now() / 1000) - 7200, ttlSec: 3600 });
  let calls = 0;
  const closedForPolicy = () => w.states.some((s) => s.code === CLOSE.POLICY);
  const w = watch(bob, {
    token: () => {
      calls++;
      if (calls === 1) return expired; // 401: no upgrade
      // Accepted, then closed with 1008 when it expires; a fresh one after that.
      return closedForPolicy() ? bob.token : mintToken(bob.id, { ttlSec: 3 });
    },
  });
  await waitFor('the expiring token closed with 1008', closedForPolicy, 30_000);
  await waitFor('live on the fresh token', w.live);
  assert.ok(calls >= 3, `token asked ${calls} times`);
  const id = await stack.backend.post(alice, 'with the fresh token');
  await waitFor('the post', () => w.ids().includes(id));
  w.client.close();
});

test('notices a dead connection (no pings for two intervals) and reconnects', async () => {
  const { alice, bob } = await pair();
  const w = watch(bob);
  await waitFor('live', w.live);
  // Quiet but alive: the gateway's pings keep it open (a negative check
  // needs a span of time: three ping intervals, one more than the limit).
  await new Promise((r) => setTimeout(r, 3 * PING_INTERVAL_MS));
  const dead = () => w.states.some((s) => s.reason === 'no pings: connection dead');
  assert.ok(!dead() && w.live(), 'a quiet connection with pings stays up');
  stack.gw.signal('SIGSTOP'); // hung: the socket stays open, nothing comes
  try {
    await waitFor('declared dead', dead, 4 * PING_INTERVAL_MS + 2000);
  } finally {
    stack.gw.signal('SIGCONT');
  }
  await waitFor('live again', w.live);
  const id = await stack.backend.post(alice, 'after the hang');
  await waitFor('the post', () => w.ids().includes(id));
  w.client.close();
});

test('backs off with jitter between failed attempts', async () => {
  const bob = { id: unique('u'), token: mintToken(unique('u')) };
  const w = watch(bob, { url: 'ws://127.0.0.1:9' }); // nothing listens: every attempt fails
  await waitFor('three retries', () => w.states.filter((s) => s.delayMs > 0).length >= 3, 10_000);
  w.client.close();
  const delays = w.states.filter((s) => s.delayMs > 0).map((s) => s.delayMs);
  assert.ok(delays[0] >= 250 && delays[0] <= 500, `first delay ${delays[0]}`);
  assert.ok(delays[1] >= 500 && delays[1] <= 1000, `second delay ${delays[1]}`);
  assert.ok(delays[2] >= 1000 && delays[2] <= 2000, `third delay ${delays[2]}`);
});
