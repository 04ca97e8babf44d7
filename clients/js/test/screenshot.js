// Regenerates the README's screenshot: Bob's page with a post of Alice's
// that arrived live. Usage: node test/screenshot.js OUT.png (or
// scripts/browser-test.sh screenshot, which writes docs/page.png).
import { startStack } from './stack.js';
import { launch, openUser, follow, post } from './pages.js';

const out = process.argv[2] || 'page.png';
const stack = await startStack();
const browser = await launch();
try {
  const alice = await openUser(browser, stack.backend, 'Alice', { lastName: `Liddell ${Date.now() % 10000}` });
  const bob = await openUser(browser, stack.backend, 'Bob', { lastName: 'Builder' });
  await follow(bob, alice);
  await post(alice, 'Morning! The feed is live.');
  await post(alice, 'This one arrived over the WebSocket while the page was open.');
  await bob.page.waitForFunction(() => document.querySelectorAll('#feed li').length === 2);
  await bob.page.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await stack.stop();
}
