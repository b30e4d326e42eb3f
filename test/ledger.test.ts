import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import Database from 'better-sqlite3';
import { runCostCommand } from '../src/cli/cost.ts';
import { Ledger, type LedgerRecord } from '../src/meter/ledger.ts';
import { CostMeter } from '../src/meter/meter.ts';
import type { FinishedRequest } from '../src/meter/types.ts';
import { Metrics } from '../src/telemetry/metrics.ts';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'tally-ledger-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function record(id: string, over: Partial<LedgerRecord> = {}): LedgerRecord {
  return {
    id, endMs: Date.UTC(2026, 10, 20, 12), arrivalMs: Date.UTC(2026, 10, 20, 12) - 1500, tenant: 'alice', model: 'stories', status: 'completed',
    promptTokens: 10, completionTokens: 20, prefillDeviceSeconds: 0.01, decodeDeviceSeconds: 0.04, usdUsage: 0.0001, usdAllocation: 0.0003,
    devicePriceUsdPerHour: 3.6, ...over,
  };
}

function finished(id: string, over: Partial<FinishedRequest> = {}): FinishedRequest {
  return {
    id, model: 'stories', tenant: 'alice', status: 'completed', promptTokens: 10, completionTokens: 20, prefillSeconds: 0.01, decodeSeconds: 0.04,
    arrivalMs: 1_800_000_000_000, endMs: 1_800_000_001_000, interTokenSeconds: [], ...over,
  };
}

describe('Ledger', () => {
  it('keeps every request across a restart, counts each id once, and groups by tenant, model and day', () => {
    const dir = tempDir();
    let ledger = new Ledger(dir);
    const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, ledger });
    const reports = new Map<string, number>();
    for (let i = 0; i < 50; i++) {
      const r = meter.requestFinished(finished(`req-${i}`, { tenant: i % 2 ? 'alice' : 'bob', status: i % 10 === 0 ? 'cancelled' : 'completed' }));
      reports.set(`req-${i}`, r.usd.usage);
    }
    // The same request reported twice is counted once.
    meter.requestFinished(finished('req-0'));
    expect(ledger.insert(record('req-1'))).toBe(false);
    ledger.close();

    ledger = new Ledger(dir);
    expect(ledger.count()).toBe(50);
    for (const [id, usd] of reports) expect(ledger.get(id)?.usdUsage).toBeCloseTo(usd, 15);
    const byTenant = ledger.query({ by: 'tenant' });
    expect(byTenant.map((r) => [r.key, r.requests, r.cancelled])).toEqual([['alice', 25, 0], ['bob', 25, 5]]);
    expect(byTenant[0].promptTokens).toBe(250);
    expect(byTenant[0].usdUsage).toBeCloseTo(25 * ((0.05 * 3.6) / 3600), 12);

    ledger.insert(record('old', { endMs: Date.UTC(2026, 9, 1, 23, 59), model: 'other' }));
    expect(ledger.query({ by: 'model' }).map((r) => [r.key, r.requests])).toEqual([['other', 1], ['stories', 50]]);
    expect(ledger.query({ by: 'day' }).map((r) => r.key)).toEqual(['2026-10-01', new Date(1_800_000_001_000).toISOString().slice(0, 10)]);
    expect(ledger.query({ by: 'model', since: new Date(Date.UTC(2026, 9, 2)) }).map((r) => r.key)).toEqual(['stories']);
    expect(ledger.integrityCheck()).toBe('ok');
    ledger.close();

    const db = new Database(join(dir, 'ledger.sqlite'), { readonly: true });
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    db.close();
  });

  it('keeps every committed request across kill -9, with no duplicates and no corruption', async () => {
    const dir = tempDir();
    const ledgerModule = resolve('src/meter/ledger.ts');
    // The child commits rows in a tight loop, printing each id only after insert() has returned.
    const script = `
      import { writeSync } from 'node:fs';
      const { Ledger } = await import(${JSON.stringify(ledgerModule)});
      const ledger = new Ledger(${JSON.stringify(dir)});
      const run = process.argv.at(-1);
      for (let i = 0; ; i++) {
        const id = run + '-' + i;
        ledger.insert({ id, endMs: Date.now(), arrivalMs: Date.now() - 5, tenant: 't' + (i % 3), model: 'm', status: 'completed',
          promptTokens: i, completionTokens: 2 * i, prefillDeviceSeconds: 0.001, decodeDeviceSeconds: 0.002, usdUsage: 1e-6, usdAllocation: 2e-6, devicePriceUsdPerHour: 3.6 });
        if (i % 7 === 0) ledger.insert({ id: run + '-0', endMs: 0, arrivalMs: 0, tenant: 'dup', model: 'm', status: 'completed',
          promptTokens: 0, completionTokens: 0, prefillDeviceSeconds: 0, decodeDeviceSeconds: 0, usdUsage: 0, usdAllocation: 0, devicePriceUsdPerHour: 0 });
        // stdout is a non-blocking pipe: when the parent falls behind, a write fails with EAGAIN (a short line
        // is written whole or not at all), and the child must try again rather than exit.
        for (;;) {
          try { writeSync(1, id + '\\n'); break; } catch (err) { if (err.code !== 'EAGAIN') throw err; }
        }
      }
    `;
    const printed: string[] = [];
    for (const run of ['a', 'b']) {
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, run], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d) => (stderr += d));
      let buffer = '';
      const exited = new Promise<void>((resolveExit) => child.on('exit', () => resolveExit()));
      await new Promise<void>((resolveEnough, reject) => {
        child.stdout.on('data', (d: Buffer) => {
          buffer += d.toString();
          if (buffer.split('\n').length > 3000) resolveEnough();
        });
        child.on('exit', (code) => reject(new Error(`child exited early (${code}): ${stderr}`)));
      });
      child.kill('SIGKILL');
      await exited;
      // Only complete lines are ids whose insert returned.
      const lines = buffer.split('\n');
      printed.push(...lines.slice(0, -1));
    }
    expect(printed.length).toBeGreaterThan(6000);

    const ledger = new Ledger(dir);
    expect(ledger.integrityCheck()).toBe('ok');
    const db = new Database(ledger.path, { readonly: true });
    const ids = new Set((db.prepare('SELECT id FROM requests').all() as { id: string }[]).map((r) => r.id));
    const n = (db.prepare('SELECT count(*) AS n, count(DISTINCT id) AS d FROM requests').get() as { n: number; d: number });
    db.close();
    expect(n.n).toBe(n.d);
    const missing = printed.filter((id) => !ids.has(id));
    expect(missing).toEqual([]);
    expect(ledger.get('a-0')?.tenant).toBe('t0');
    ledger.close();
  });
});

describe('cached prompt tokens in the ledger', () => {
  it('records them, sums them per group, and a ledger from before them gains the column (read-only: reads 0)', async () => {
    const dir = tempDir();
    // A ledger file written before prefix caching: the old table, one row.
    const old = new Database(join(dir, 'ledger.sqlite'));
    old.exec(`CREATE TABLE requests (id TEXT PRIMARY KEY, end_ms INTEGER NOT NULL, arrival_ms INTEGER NOT NULL, tenant TEXT NOT NULL,
      model TEXT NOT NULL, status TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
      prefill_device_seconds REAL NOT NULL, decode_device_seconds REAL NOT NULL, usd_usage REAL NOT NULL, usd_allocation REAL NOT NULL,
      device_price_usd_per_hour REAL NOT NULL)`);
    old.prepare('INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)').run('before', Date.UTC(2026, 10, 20), Date.UTC(2026, 10, 20), 'alice', 'stories', 'completed', 100, 10, 0.1, 0.1, 0.001, 0.002, 3.6);
    old.close();
    const readOnly = new Ledger(dir, { readonly: true });
    expect(readOnly.query({ by: 'tenant' })[0]).toMatchObject({ promptTokens: 100, cachedTokens: 0 });
    readOnly.close();

    const ledger = new Ledger(dir);
    const metrics = new Metrics();
    const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, ledger, metrics });
    const cost = meter.requestFinished(finished('hit', { promptTokens: 2000, cachedTokens: 1984 }));
    expect(await metrics.registry.metrics()).toContain('tally:cached_prompt_tokens_total{model="stories",tenant="alice"} 1984');
    expect(cost.tokens).toEqual({ prompt: 2000, cached_prompt: 1984, completion: 20 });
    ledger.insert(record('bob', { tenant: 'bob', promptTokens: 50, cachedTokens: 0 }));
    expect(ledger.get('hit')?.cachedTokens).toBe(1984);
    expect(ledger.get('before')?.cachedTokens).toBe(0);
    const rows = ledger.query({ by: 'tenant' });
    expect(rows.map((r) => [r.key, r.promptTokens, r.cachedTokens])).toEqual([['alice', 2100, 1984], ['bob', 50, 0]]);
    ledger.close();

    const out: string[] = [];
    expect(await runCostCommand(['--data-dir', dir, '--format', 'json'], { out: (t) => out.push(t), err: () => {} })).toBe(0);
    const report = JSON.parse(out.join(''));
    expect(report.rows[0]).toMatchObject({ key: 'alice', prompt_tokens: 2100, cached_prompt_tokens: 1984 });
    expect(report.rows[0].prefix_cache_hit_rate).toBeCloseTo(1984 / 2100, 12);
    expect(report.total.cached_prompt_tokens).toBe(1984);
  });
});

describe('tally cost', () => {
  function capture() {
    let out = '';
    let err = '';
    return { io: { out: (t: string) => void (out += t), err: (t: string) => void (err += t) }, out: () => out, err: () => err };
  }

  it('reports from the ledger as a table or JSON, by tenant, model or day, since a date or duration', async () => {
    const dir = tempDir();
    const ledger = new Ledger(dir);
    const now = Date.UTC(2026, 10, 28, 12);
    ledger.insert(record('1', { endMs: now - 3_600_000, tenant: 'alice', usdUsage: 0.5, usdAllocation: 1.5 }));
    ledger.insert(record('2', { endMs: now - 2 * 86_400_000, tenant: 'bob', usdUsage: 0.25, usdAllocation: 0.5, status: 'cancelled' }));
    ledger.insert(record('3', { endMs: now - 60_000, tenant: 'alice', model: 'tiny', usdUsage: 0.125, usdAllocation: 0.25 }));
    ledger.close();

    let c = capture();
    expect(await runCostCommand(['--data-dir', dir, '--by', 'tenant', '--format', 'json'], c.io, () => now)).toBe(0);
    const all = JSON.parse(c.out());
    expect(all.rows.map((r: any) => [r.key, r.requests, r.cancelled])).toEqual([['alice', 2, 0], ['bob', 1, 1]]);
    expect(all.total.usd).toEqual({ usage: 0.875, allocation: 2.25 });
    expect(all.total.usd_per_million_tokens.usage).toBeCloseTo((0.875 / 90) * 1e6, 6);

    c = capture();
    expect(await runCostCommand(['--data-dir', dir, '--by', 'model', '--since', '24h', '--format', 'json'], c.io, () => now)).toBe(0);
    expect(JSON.parse(c.out()).rows.map((r: any) => [r.key, r.requests])).toEqual([['stories', 1], ['tiny', 1]]);

    c = capture();
    expect(await runCostCommand(['--data-dir', dir, '--by', 'day', '--since', '2026-11-26'], c.io, () => now)).toBe(0);
    const lines = c.out().trim().split('\n');
    expect(lines[0]).toMatch(/^DAY\s+REQUESTS\s+CANCELLED\s+PROMPT TOK\s+CACHED TOK\s+HIT RATE\s+COMPL TOK\s+PREFILL DEV-S\s+DECODE DEV-S\s+USD USAGE\s+USD ALLOC\s+\$\/M USAGE\s+\$\/M ALLOC$/);
    expect(lines[1]).toMatch(/^2026-11-26\s+1\s+1\s/);
    expect(lines[2]).toMatch(/^2026-11-28\s+2\s+0\s/);
    expect(lines.at(-1)).toMatch(/^total\s+3\s+1\s+30\s+0\s+0.0%\s+60\s/);

    c = capture();
    expect(await runCostCommand(['--data-dir', dir, '--by', 'week'], c.io)).toBe(2);
    expect(c.err()).toContain('--by must be tenant, model or day');
    c = capture();
    expect(await runCostCommand(['--data-dir', dir, '--since', 'yesterday'], c.io)).toBe(2);
    c = capture();
    expect(await runCostCommand(['--data-dir', join(dir, 'nope')], c.io)).toBe(1);
    expect(c.err()).toContain('no ledger');
  });
});
