// Driving the backend's page at `/` in Debian's Chromium (playwright-core,
// no browser download): a user per browser context, through the page's own
// forms, as a person would.
import { chromium } from 'playwright-core';
import { existsSync } from 'node:fs';

import { unique } from './stack.js';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export async function launch() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} missing: apt-get install -y chromium (or set CHROMIUM)`);
  // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
  return chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
}

/**
 * A user's page: registers through the form and waits until the feed is
 * live. `noWebSocket` deletes `window.WebSocket` before the page's scripts
 * run, as in a browser without it; `brokenWebSocket` sends every WebSocket
 * to a closed port, as a proxy that breaks the upgrade would. Either way the
 * client falls back to SSE.
 */
export async function openUser(browser, backend, firstName, { noWebSocket = false, brokenWebSocket = false, lastName = unique('L').slice(0, 20) } = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 640 } });
  if (noWebSocket) await context.addInitScript(() => delete window.WebSocket);
  // A proxy that breaks the upgrade: every WebSocket fails to open.
  if (brokenWebSocket) {
    await context.addInitScript(() => {
      const Real = window.WebSocket;
      window.WebSocket = function () {
        return new Real('ws://127.0.0.1:9/');
      };
    });
  }
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${firstName}] page error:`, e));
  await page.goto(backend.url + '/');
  await page.fill('#register-form [name=first_name]', firstName);
  await page.fill('#register-form [name=second_name]', lastName);
  await page.fill('#register-form [name=password]', 'correct horse battery');
  await page.click('#register-form button');
  await page.waitForSelector('#signed-in:not([hidden]), #error:not([hidden])');
  if (await page.isVisible('#error')) throw new Error(`${firstName}: the page says ${await page.textContent('#error')}`);
  await page.waitForSelector('#conn[data-state=live]');
  if (await page.isVisible('#signed-out')) throw new Error(`${firstName}: the login forms are still shown`);
  const id = await page.evaluate(() => JSON.parse(sessionStorage.getItem('feed.session')).id);
  return { context, page, id, firstName, lastName };
}

/** `who` finds `target` by name and follows them. */
export async function follow(who, target) {
  await who.page.fill('#search-form [name=first_name]', target.firstName);
  await who.page.fill('#search-form [name=last_name]', target.lastName);
  await who.page.click('#search-form button');
  const button = who.page.locator(`#people li[data-id="${target.id}"] button`);
  await button.click();
  await who.page.waitForSelector(`#people li[data-id="${target.id}"] button:disabled`);
}

/** Posts through the form, waits until the API took it, returns when (ms) it did. */
export async function post(who, text) {
  await who.page.fill('#post-form textarea', text);
  const created = who.page.waitForResponse((r) => r.url().endsWith('/post/create') && r.ok());
  await who.page.click('#post-form button');
  await created;
  return Date.now();
}

/** How many times the feed on `who`'s page shows `text`. */
export function shown(who, text) {
  return who.page.locator('#feed li .text', { hasText: new RegExp(`^${text}$`) }).count();
}

export function connLabel(who) {
  return who.page.textContent('#conn');
}
