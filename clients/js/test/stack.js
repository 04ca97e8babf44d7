// The real stack for the client's and the page's tests: gateway and backend
// processes (the workspace's binaries) on free ports, against the machine's
// PostgreSQL, Redis and RabbitMQ. Isolation as in the Rust tests: a RabbitMQ
// vhost of this test process, a membership key and fan-out queue of its
// own, a database of its own, fresh user ids; nothing shared is flushed.
//
// FEED_BIN_DIR picks the binaries (default: target/debug of the workspace);
// NODE_LOG=info shows the processes' logs.

import { spawn, execFileSync } from 'node:child_process';
import { createHmac, randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const BIN_DIR = process.env.FEED_BIN_DIR || path.join(ROOT, 'target/debug');
export const SECRET = 'js-client-test-secret-0123456789';
/** Generous: CI machines are noisy; waits end as soon as the thing happens. */
export const WAIT_MS = 20_000;
/** The gateways' ping interval here: short, so a dead connection shows in seconds. */
export const PING_INTERVAL_MS = 1_000;
const VHOST_PREFIX = 'js-test-';
const DATABASE = 'feed_jstest';

export function unique(prefix) {
  return `${prefix}-${randomUUID()}`;
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it is true (or throws after `ms`). */
export async function waitFor(what, check, ms = WAIT_MS) {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function rabbitmqctl(...args) {
  return execFileSync('rabbitmqctl', args, { encoding: 'utf8' });
}

/** This process's vhost; those of exited test processes are deleted. */
function vhost() {
  const name = `${VHOST_PREFIX}${process.pid}`;
  for (const old of rabbitmqctl('list_vhosts', '-q', '--no-table-headers', 'name').split('\n')) {
    const pid = old.startsWith(VHOST_PREFIX) ? Number(old.slice(VHOST_PREFIX.length)) : NaN;
    if (pid && pid !== process.pid && !existsSync(`/proc/${pid}`)) {
      // Best effort: a concurrent test process may be deleting it too.
      try {
        rabbitmqctl('delete_vhost', old);
      } catch {}
    }
  }
  if (!rabbitmqctl('list_vhosts', '-q', '--no-table-headers', 'name').split('\n').includes(name)) {
    rabbitmqctl('add_vhost', name);
    rabbitmqctl('set_permissions', '-p', name, 'guest', '.*', '.*', '.*');
  }
  return name;
}

/** An HS256 JWT, as the backend issues them. */
export function mintToken(sub, { ttlSec = 3600, iat = Math.floor(Date.now() / 1000) } = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, iat, exp: iat + ttlSec });
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

class Proc {
  constructor(name, bin, args, env) {
    this.name = name;
    this.bin = bin;
    this.args = args;
    this.env = env;
  }

  start() {
    const verbose = !!process.env.NODE_LOG;
    this.child = spawn(path.join(BIN_DIR, this.bin), this.args, {
      env: { PATH: process.env.PATH, RUST_LOG: process.env.NODE_LOG || 'warn', NO_COLOR: '1', ...this.env },
      stdio: ['ignore', verbose ? 'inherit' : 'ignore', 'inherit'],
    });
    this.exited = new Promise((r) => this.child.once('exit', (code, sig) => r({ code, sig })));
    return this;
  }

  signal(sig) {
    this.child.kill(sig);
  }

  /** SIGTERM (a clean stop: devices get 1001), then waits for the exit. */
  async stop() {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    await this.exited;
  }
}

export class Gateway extends Proc {
  constructor(stack, port, id = unique('gw')) {
    const addr = `127.0.0.1:${port}`;
    super(`gateway ${id}`, 'gateway', ['--listen', addr, '--node-id', id, '--advertise-url', `ws://${addr}`], {
      JWT_SECRET: SECRET,
      AMQP_URL: stack.amqpUrl,
      REDIS_URL: stack.redisUrl,
      MEMBERSHIP_KEY: stack.membershipKey,
      GATEWAY_PING_INTERVAL: `${PING_INTERVAL_MS}ms`,
      GATEWAY_SHUTDOWN_GRACE: '2s',
    });
    this.id = id;
    this.port = port;
    this.url = `ws://${addr}`;
    this.httpUrl = `http://${addr}`;
  }

  async ready() {
    await waitFor(`${this.name} ready`, async () => (await fetch(`${this.httpUrl}/readyz`)).ok);
    return this;
  }
}

export class Backend extends Proc {
  constructor(stack, port, gatewayUrl) {
    super('backend', 'backend', [], {
      JWT_SECRET: SECRET,
      BACKEND_LISTEN: `127.0.0.1:${port}`,
      AMQP_URL: stack.amqpUrl,
      REDIS_URL: stack.redisUrl,
      DATABASE_URL: `postgres://postgres@127.0.0.1:5432/${DATABASE}`,
      MEMBERSHIP_KEY: stack.membershipKey,
      FANOUT_QUEUE: stack.fanoutQueue,
      // Cheap hashes: these tests register users, they do not test argon2.
      ARGON2_MEMORY_KIB: '64',
      ARGON2_ITERATIONS: '1',
      GATEWAY_PUBLIC_URL: gatewayUrl,
      GATEWAY_PING_INTERVAL: `${PING_INTERVAL_MS}ms`,
      // The worker metrics listener is unused here but must not collide.
      BACKEND_WORKER_METRICS_LISTEN: '127.0.0.1:0',
    });
    this.url = `http://127.0.0.1:${port}`;
  }

  async ready() {
    await waitFor('backend ready', async () => (await fetch(`${this.url}/readyz`)).ok, 60_000);
    return this;
  }

  async call(method, route, { token, body } = {}) {
    const headers = {};
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const resp = await fetch(`${this.url}${route}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await resp.text();
    if (!resp.ok) throw new Error(`${method} ${route}: ${resp.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  /** Registers and logs in a user; returns `{id, token, password}`. */
  async user(firstName = 'Test') {
    const password = 'correct horse battery';
    const { user_id: id } = await this.call('POST', '/user/register', {
      body: { first_name: firstName, second_name: unique('S'), birthdate: '1990-01-01', biography: '', city: 'Test', password },
    });
    const { token } = await this.call('POST', '/login', { body: { id, password } });
    return { id, token, password };
  }

  follow(user, target) {
    return this.call('PUT', `/friend/set/${target.id}`, { token: user.token });
  }

  post(user, text) {
    return this.call('POST', '/post/create', { token: user.token, body: { text } });
  }
}

/** Services, the first gateway and the backend, started and ready. */
export async function startStack() {
  const stack = {
    amqpUrl: `amqp://guest:guest@127.0.0.1:5672/${vhost()}`,
    redisUrl: 'redis://127.0.0.1:6379',
    membershipKey: unique('jstest:members'),
    fanoutQueue: unique('jstest.fanout'),
    procs: [],
  };
  stack.gateway = async (port, id) => {
    const g = new Gateway(stack, port ?? (await freePort()), id).start();
    stack.procs.push(g);
    return g.ready();
  };
  stack.gw = await stack.gateway();
  stack.backend = new Backend(stack, await freePort(), stack.gw.url).start();
  stack.procs.push(stack.backend);
  await stack.backend.ready();
  stack.stop = async () => {
    await Promise.all(stack.procs.map((p) => p.stop()));
    try {
      execFileSync('redis-cli', ['DEL', stack.membershipKey], { stdio: 'ignore' });
    } catch {}
  };
  return stack;
}
