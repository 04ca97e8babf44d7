// The page at `/` in a real Chromium, two users in two browser contexts,
// against real backend and gateway processes (stack.js).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { startStack, waitFor, PING_INTERVAL_MS } from './stack.js';
import { launch, openUser, follow, post, shown, connLabel } from './pages.js';

/** The bound for a live post to show on the follower's page. */
const LIVE_WITHIN_MS = 1_000;

let stack;
let browser;
before(async () => {
  stack = await startStack();
  browser = await launch();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

async function scenario(t, options) {
  const alice = await openUser(browser, stack.backend, 'Alice', options);
  const bob = await openUser(browser, stack.backend, 'Bob', options);
  try {
    const transport = options.noWebSocket || options.brokenWebSocket ? 'sse' : 'websocket';
    assert.equal(await bob.page.getAttribute('#conn', 'data-transport'), transport);
    await follow(bob, alice);

    // From the API's answer to Alice's page (the post is stored) to the
    // post on Bob's page: fan-out, broker, gateway, client, DOM.
    const started = await post(alice, 'first live post');
    await bob.page.waitForFunction(
      () => [...document.querySelectorAll('#feed li .text')].some((e) => e.textContent === 'first live post'),
      null,
      { timeout: 10_000 },
    );
    const took = Date.now() - started;
    t.diagnostic(`first post shown on Bob's page ${took} ms after the API took it`);
    assert.ok(took < LIVE_WITHIN_MS, `shown after ${took} ms`);

    // Bob's node restarts (a clean stop: 1001) while Alice posts twice more.
    const { port, id } = stack.gw;
    await stack.gw.stop();
    await bob.page.waitForSelector('#conn[data-state=reconnecting]');
    await post(alice, 'while down 1');
    await post(alice, 'while down 2');
    stack.gw = await stack.gateway(port, id);
    await bob.page.waitForFunction(
      () => ['while down 1', 'while down 2'].every((t) => [...document.querySelectorAll('#feed li .text')].some((e) => e.textContent === t)),
      null,
      { timeout: 20_000 },
    );
    await waitFor('live again', async () => (await bob.page.getAttribute('#conn', 'data-state')) === 'live');
    // Each once, and nothing else doubled (a replay overlapping the feed would show here).
    for (const text of ['first live post', 'while down 1', 'while down 2']) assert.equal(await shown(bob, text), 1, text);
    assert.equal(await bob.page.locator('#feed li').count(), 3);
    assert.equal(await bob.page.getAttribute('#conn', 'data-transport'), transport);
    // Recovered by the replay, not a reload; how many depends on whether the
    // fan-out got there before the node was back (else they came live).
    const label = await connLabel(bob);
    assert.match(label, /^live/);
    t.diagnostic(`after the restart Bob's badge says: ${label}`);
  } finally {
    await alice.context.close();
    await bob.context.close();
  }
}

test('WebSocket: a post shows live within a second; a node restart loses nothing and doubles nothing', async (t) => {
  await scenario(t, { noWebSocket: false });
});

test('SSE, with WebSocket deleted from the page: the same', async (t) => {
  await scenario(t, { noWebSocket: true });
});

test('SSE after WebSocket keeps failing to open (a proxy breaking the upgrade): the same', async (t) => {
  await scenario(t, { brokenWebSocket: true });
});

test('a hung node is noticed by the page (it sees no pings: the /healthz probe), and a quiet live one is not', async () => {
  const bob = await openUser(browser, stack.backend, 'Bob');
  const states = () => bob.page.evaluate(() => window.feedStates);
  try {
    // Quiet but alive for three ping intervals (one more than the limit):
    // the probe finds the node answering and the page stays live.
    await bob.page.waitForTimeout(3 * PING_INTERVAL_MS);
    assert.equal(await bob.page.getAttribute('#conn', 'data-state'), 'live');
    assert.ok(!(await states()).some((s) => s.state === 'reconnecting'), 'no reconnect while quiet');
    stack.gw.signal('SIGSTOP'); // hung: the socket stays open, nothing comes, /healthz does not answer
    try {
      await bob.page.waitForSelector('#conn[data-state=reconnecting]', { timeout: 2 * PING_INTERVAL_MS + 3_000 + 5_000 });
      assert.ok((await states()).some((s) => s.reason === 'no pings: connection dead'), 'declared dead by the watch');
    } finally {
      stack.gw.signal('SIGCONT');
    }
    await bob.page.waitForSelector('#conn[data-state=live]', { timeout: 20_000 });
  } finally {
    await bob.context.close();
  }
});
