/** Hashed API keys, `tally keys`, per-key rate limits and budgets; keys never reach logs or metrics. */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Ledger } from '../src/meter/ledger.ts';
import { formatKeyEntry, keyDigest, parseKeysFile, readKeysFile } from '../src/server/api-keys.ts';
import { runKeysCommand } from '../src/cli/keys.ts';
import { type RunningServer } from '../src/server/start.ts';
import { TenantLimiter } from '../src/server/tenant-limits.ts';
import { storiesModel } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const tmp = (prefix: string) => fs.mkdtempSync(path.join(os.tmpdir(), prefix));

/** Runs `tally keys` in-process; returns code, stdout lines and stderr text. */
async function keys(...argv: string[]): Promise<{ code: number; out: string[]; err: string }> {
  const out: string[] = [];
  let err = '';
  const code = await runKeysCommand(argv, (s) => out.push(s), (s) => (err += `${s}\n`));
  return { code, out, err };
}

describe('keys file', () => {
  it('parses names, digests and limits; refuses malformed lines with file:line', () => {
    const hex = keyDigest('k1').toString('hex');
    const entries = parseKeysFile(`# comment\n\nacme: sha256:${hex} rpm=60 tpm=1000 budget_usd=2.5\nbeta: sha256:${keyDigest('k2').toString('hex')}\n`, 'f');
    expect(entries.map((e) => [e.name, e.rpm, e.tpm, e.budgetUsd])).toEqual([['acme', 60, 1000, 2.5], ['beta', undefined, undefined, undefined]]);
    expect(entries[0].digest.equals(keyDigest('k1'))).toBe(true);
    expect(formatKeyEntry(entries[0])).toBe(`acme: sha256:${hex} rpm=60 tpm=1000 budget_usd=2.5`);
    expect(() => parseKeysFile('acme: plaintext-key', 'f')).toThrow(/f:1: expected/);
    expect(() => parseKeysFile(`a: sha256:${hex}\nb: sha256:${hex}`, 'f')).toThrow(/f:2: the same key hash appears twice/);
    expect(() => parseKeysFile(`a: sha256:${hex} rpm=0`, 'f')).toThrow(/rpm must be a positive integer/);
    expect(() => parseKeysFile(`a: sha256:${hex} rate=3`, 'f')).toThrow(/unknown option "rate"/);
    expect(() => parseKeysFile(`../x: sha256:${hex}`, 'f')).toThrow(/not a valid name/);
  });

  it('tally keys add prints the key once and stores only its hash; list and revoke', async () => {
    const file = path.join(tmp('tally-keys-'), 'keys');
    const added = await keys('add', 'acme', '--file', file, '--rpm', '10', '--tpm', '5000', '--budget-usd', '1.5');
    expect(added.code).toBe(0);
    const key = added.out[0];
    expect(key).toMatch(/^tly_[\w-]{43}$/);
    const text = fs.readFileSync(file, 'utf8');
    expect(text).not.toContain(key);
    expect(text).toContain(`acme: sha256:${keyDigest(key).toString('hex')} rpm=10 tpm=5000 budget_usd=1.5`);
    expect(fs.statSync(file).mode & 0o077).toBe(0);
    expect((await keys('add', 'acme', '--file', file)).code).toBe(1);
    expect((await keys('add', 'bad/name', '--file', file)).code).toBe(1);
    expect((await keys('add', 'beta', '--file', file, '--rpm', 'x')).code).toBe(1);
    const beta = (await keys('add', 'beta', '--file', file)).out[0];
    expect(beta).not.toBe(key);

    const listed = await keys('list', '--file', file, '--data-dir', tmp('tally-nodata-'));
    expect(listed.out[0].split(/\s+/)).toEqual(['name', 'hash', 'rpm', 'tpm', 'budget_usd', 'spent_usd']);
    expect(listed.out[1].split(/\s+/)).toEqual(['acme', `sha256:${keyDigest(key).toString('hex').slice(0, 12)}…`, '10', '5000', '1.5', '-']);
    expect(listed.out.join('\n')).not.toContain(keyDigest(key).toString('hex'));

    expect((await keys('revoke', 'acme', '--file', file)).code).toBe(0);
    expect(readKeysFile(file).map((e) => e.name)).toEqual(['beta']);
    expect((await keys('revoke', 'acme', '--file', file)).code).toBe(1);

    // The real command line.
    const cli = spawnSync(process.execPath, ['bin/tally.js', 'keys', 'list', '--file', file], { encoding: 'utf8' });
    expect(cli.status).toBe(0);
    expect(cli.stdout).toMatch(/^name\s+hash/);
    expect(cli.stdout).toContain('beta');
  });
});

describe('TenantLimiter', () => {
  it('token buckets refill per minute, unused reserved tokens come back, budgets count spend', () => {
    let now = 0;
    const limiter = new TenantLimiter(() => ({ rpm: 2, tpm: 100, budgetUsd: 1 }), [['t', 0.5]], () => now);
    const a = limiter.admit('t', 60);
    limiter.settle(a, 10, 0.2);
    limiter.admit('t', 80);
    const e = (() => {
      try {
        limiter.admit('t', 1);
      } catch (err) {
        return err as { status: number; message: string; headers: Record<string, string> };
      }
    })();
    expect(e?.status).toBe(429);
    expect(e?.message).toContain('2 requests per minute');
    expect(Number(e?.headers['Retry-After'])).toBe(30);
    now += 30_000;
    limiter.admit('t', 1);
    expect(() => limiter.admit('t', 101)).toThrow(/Request too large/);
    limiter.settle({ tenant: 't', tokens: 0 }, 0, 0.3);
    expect(limiter.spentUsd('t')).toBeCloseTo(1.0);
    expect(() => limiter.admit('t', 1)).toThrow(/budget of this API key \(1 USD\) is spent/);
  });
});

describe('a server with a keys file', () => {
  let file: string;
  let dataDir: string;
  let server: RunningServer;
  let logText = '';
  const k: Record<string, string> = {};

  const start = () =>
    startServerWith(
      {
        model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', dataDir, logLevel: 'info', maxNumSeqs: 8, kvCacheGb: 0.25, threads: 1,
        apiKeysFile: file,
        // $1000 per device-second: a few short requests spend dollars.
        devicePrice: '3600000',
      },
      pino({ level: 'info' }, { write: (line: string) => void (logText += line) }),
    );

  beforeAll(async () => {
    file = path.join(tmp('tally-keys-srv-'), 'keys');
    dataDir = tmp('tally-keys-data-');
    for (const [name, ...opts] of [['open'], ['limited', '--rpm', '3'], ['tokens', '--tpm', '100'], ['budget', '--budget-usd', '0.5'], ['spent', '--budget-usd', '5'], ['gone']]) {
      k[name] = (await keys('add', name, '--file', file, ...opts)).out[0];
    }
    // `spent` already spent $10 before this start.
    const ledger = new Ledger(dataDir);
    ledger.insert({ id: 'old-1', endMs: Date.now() - 1000, arrivalMs: Date.now() - 2000, tenant: 'spent', model: 'm', status: 'completed', promptTokens: 1, completionTokens: 1, prefillDeviceSeconds: 1, decodeDeviceSeconds: 1, usdUsage: 10, usdAllocation: 10, devicePriceUsdPerHour: 1 });
    ledger.close();
    server = await start();
  });
  afterAll(() => server?.shutdown(1));

  const call = async (key: string | undefined, body: Record<string, unknown> = {}) => {
    const r = await fetch(`${server.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
      body: JSON.stringify({ prompt: 'Once upon a time', max_tokens: 4, ...body }),
    });
    return { status: r.status, headers: r.headers, body: (await r.json()) as { error?: { type: string; code: string; message: string }; usage?: { total_tokens: number } } };
  };

  it('authenticates by hash: 401 without or with a wrong key', async () => {
    expect((await call(k.open)).status).toBe(200);
    expect((await call(undefined)).status).toBe(401);
    expect((await call(`${k.open}x`)).status).toBe(401);
    expect((await call(keyDigest(k.open).toString('hex'))).status).toBe(401);
  });

  it('requests per minute: 429 with Retry-After past rpm', async () => {
    const results = [];
    for (let i = 0; i < 4; i++) results.push(await call(k.limited));
    expect(results.slice(0, 3).map((r) => r.status)).toEqual([200, 200, 200]);
    expect(results[3].status).toBe(429);
    expect(results[3].body.error).toMatchObject({ type: 'rate_limit_exceeded', code: 'rate_limit_exceeded' });
    expect(results[3].body.error!.message).toContain('3 requests per minute');
    expect(Number(results[3].headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
  });

  it('tokens per minute: reserves prompt + max_tokens, gives back what was not used', async () => {
    const tooBig = await call(k.tokens, { max_tokens: 200 });
    expect(tooBig.status).toBe(429);
    expect(tooBig.body.error!.message).toContain('Request too large');
    // Each reserves ~85 of the 100; a stop string ends it after a token or two and the rest comes back
    // (without that, b would be refused).
    const a = await call(k.tokens, { max_tokens: 80, stop: [' '] });
    expect(a.status).toBe(200);
    expect(a.body.usage!.total_tokens).toBeLessThan(20);
    const b = await call(k.tokens, { max_tokens: 80, stop: [' '] });
    expect(b.status).toBe(200);
    const c = await call(k.tokens, { max_tokens: 90, ignore_eos: true });
    expect(c.status).toBe(429);
    expect(c.body.error!.message).toContain('100 tokens per minute');
  });

  it('budget: spend metered from the ledger, 429 insufficient_quota once past, also after a restart', async () => {
    const spent = await call(k.spent);
    expect(spent.status).toBe(429);
    expect(spent.body.error).toMatchObject({ type: 'insufficient_quota', code: 'budget_exceeded' });
    expect(spent.body.error!.message).toContain('5 USD');

    let admitted = 0;
    let refused: Awaited<ReturnType<typeof call>> | undefined;
    for (let i = 0; i < 100 && !refused; i++) {
      const r = await call(k.budget, { max_tokens: 16, ignore_eos: true });
      if (r.status === 200) admitted++;
      else refused = r;
    }
    expect(admitted).toBeGreaterThan(0);
    expect(refused?.status).toBe(429);
    expect(refused?.body.error?.code).toBe('budget_exceeded');
    const ledger = new Ledger(dataDir, { readonly: true });
    const row = ledger.query({ by: 'tenant' }).find((r) => r.key === 'budget')!;
    ledger.close();
    expect(row.usdUsage).toBeGreaterThanOrEqual(0.5);
    expect(row.requests).toBe(admitted);

    await server.shutdown(1);
    server = await start();
    expect((await call(k.budget)).body.error?.code).toBe('budget_exceeded');
    expect((await call(k.open)).status).toBe(200);
  });

  it('re-reads the keys file: a revoked key stops working, a new one starts', async () => {
    expect((await call(k.gone)).status).toBe(200);
    expect((await keys('revoke', 'gone', '--file', file)).code).toBe(0);
    const fresh = (await keys('add', 'fresh', '--file', file)).out[0];
    await new Promise((r) => setTimeout(r, 1100));
    expect((await call(k.gone)).status).toBe(401);
    expect((await call(fresh)).status).toBe(200);
    k.fresh = fresh;
  });

  it('never writes a key (or its full hash) to logs or metrics', async () => {
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toContain('tenant="open"');
    expect(logText).toContain('"tenant":"limited"');
    for (const key of Object.values(k)) {
      for (const secret of [key, keyDigest(key).toString('hex')]) {
        expect(logText).not.toContain(secret);
        expect(metrics).not.toContain(secret);
      }
    }
  });
});
