/**
 * The dashboard (GET /, data from GET /v1/dashboard) on a real Tally with two tenants under load, in
 * headless Chromium (from npm: test/helpers/browser.ts) at 1280×800:
 *
 * - under load, every figure on the page is the snapshot the page last rendered, written by format.js,
 *   and the charts plot that snapshot's numbers (the bars are /v1/cost's $/M tokens and API prices, the
 *   break-even crossings are its break_even points); the page updates, loads nothing from elsewhere, fits
 *   1280×800 and is saved as test-output/dashboard.png;
 * - with the load stopped, the page's snapshot is GET /v1/cost and /metrics at the same moment: figures
 *   of busy time and tokens are equal, and those that grow with wall-clock time differ by exactly the
 *   time between the two reads; the ledger tables are the ledger's rows and /metrics' tenant counters.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { format, pick } from '../src/dashboard/public/format.js';
import { breakEvenPlot, priceBars, type DashboardSnapshot } from '../src/dashboard/snapshot.ts';
import { Ledger } from '../src/meter/ledger.ts';
import type { RunningServer } from '../src/server/start.ts';
import { launchBrowser } from './helpers/browser.ts';
import { storiesModel } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const OUT = path.resolve('test-output');
const KEYS: Record<string, string> = { alice: 'sk-alice-0000001', bob: 'sk-bob-000000002' };
const auth = (tenant = 'alice') => ({ authorization: `Bearer ${KEYS[tenant]}` });

/** Closed-loop load: `clients` per tenant, each sending the next completion when its last one ends. */
class Load {
  stopped = false;
  errors: string[] = [];
  done: Record<string, number> = {};
  private readonly running: Promise<void>[] = [];

  constructor(url: string, clients: Record<string, number>) {
    let n = 0;
    for (const [tenant, count] of Object.entries(clients)) {
      this.done[tenant] = 0;
      for (let c = 0; c < count; c++) {
        this.running.push(
          (async () => {
            while (!this.stopped) {
              const i = n++;
              const res = await fetch(`${url}/v1/completions`, {
                method: 'POST',
                headers: { 'content-type': 'application/json', ...auth(tenant) },
                body: JSON.stringify({ model: 'stories260K', prompt: ['Once upon a time', 'The little dog', 'Lily and Ben went to the park', 'One day'][i % 4], max_tokens: 24 + (i % 4) * 24, temperature: 0.8, seed: i }),
              }).catch((err: Error) => err);
              if (res instanceof Error) this.errors.push(res.message);
              else if (res.status !== 200) this.errors.push(`${res.status} ${await res.text()}`);
              else {
                await res.json();
                this.done[tenant]++;
              }
            }
          })(),
        );
      }
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.running);
  }
}

/** Leaves of a JSON value by dotted path. */
function flatten(value: unknown, prefix = '', out = new Map<string, unknown>()): Map<string, unknown> {
  if (value !== null && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else out.set(prefix, value);
  return out;
}

/** Prometheus text → [name, labels, value]. */
function parseMetrics(text: string): { name: string; labels: Record<string, string>; value: number }[] {
  return text
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .map((line) => {
      const m = /^([^{\s]+)(?:\{(.*)\})?\s+(\S+)$/.exec(line)!;
      const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
      return { name: m[1], labels, value: Number(m[3]) };
    });
}

let tmp: string;
let server: RunningServer;

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-dashboard-'));
  fs.mkdirSync(OUT, { recursive: true });
  server = await startServerWith({
    model: storiesModel(),
    host: '127.0.0.1',
    port: 0,
    device: 'cpu',
    threads: 1,
    dataDir: path.join(tmp, 'data'),
    logLevel: 'silent',
    apiKeys: Object.entries(KEYS).map(([tenant, key]) => `${tenant}:${key}`),
  });
});

afterAll(async () => {
  await server?.shutdown(1);
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('dashboard routes', () => {
  it('serves the page and its assets from its own origin, and the data behind the API keys', async () => {
    for (const p of ['/', '/dashboard']) {
      const res = await fetch(server.url + p);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      expect(res.headers.get('content-security-policy')).toContain("default-src 'none'");
      const html = await res.text();
      expect(html).not.toMatch(/https?:\/\//);
      const assets = [...html.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1]).filter((u) => !u.startsWith('data:'));
      expect(assets.sort()).toEqual(['/dashboard/assets/app.js', '/dashboard/assets/chart.umd.min.js', '/dashboard/assets/dashboard.css']);
    }
    for (const [name, type] of [['app.js', 'text/javascript'], ['format.js', 'text/javascript'], ['dashboard.css', 'text/css'], ['chart.umd.min.js', 'text/javascript']]) {
      const res = await fetch(`${server.url}/dashboard/assets/${name}`);
      expect(res.status, name).toBe(200);
      expect(res.headers.get('content-type'), name).toContain(type);
      const text = await res.text();
      if (name === 'chart.umd.min.js') expect(text).toMatch(/^\/\*!\n \* Chart\.js v4\./);
      else expect(text).not.toMatch(/https?:\/\/(?!www\.w3\.org)/);
    }
    for (const bad of ['nope.js', '..%2F..%2Fpackage.json', 'index.html']) expect((await fetch(`${server.url}/dashboard/assets/${bad}`)).status, bad).toBe(404);

    expect((await fetch(`${server.url}/v1/dashboard`)).status).toBe(401);
    const res = await fetch(`${server.url}/v1/dashboard`, { headers: auth() });
    expect(res.status).toBe(200);
    const snap = (await res.json()) as DashboardSnapshot;
    expect(snap.object).toBe('dashboard_snapshot');
    // The snapshot's report has /v1/cost's shape, field for field.
    const cost = await (await fetch(`${server.url}/v1/cost`, { headers: auth() })).json();
    const keys = (v: unknown) => [...flatten(v).keys()].filter((k) => !k.startsWith('device_telemetry.')).sort();
    expect(keys(snap.cost)).toEqual(keys(cost));
  });
});

describe('dashboard in Chromium under load', () => {
  let browser: Browser;
  let page: Page;
  let load: Load | undefined;
  const requested: string[] = [];
  /** Script errors, CSP violations and failed loads the page reported (but the 401 that asks for a key). */
  const problems: string[] = [];
  /** Every snapshot the page received, by seq. */
  const received = new Map<number, DashboardSnapshot>();
  const pending: Promise<unknown>[] = [];

  beforeAll(async () => {
    browser = await launchBrowser();
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on('request', (r) => requested.push(r.url()));
    page.on('pageerror', (err) => problems.push(err.message));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(m.text());
    });
    page.on('response', (r) => {
      if (new URL(r.url()).pathname !== '/v1/dashboard' || r.status() !== 200) return;
      pending.push(r.json().then((s: DashboardSnapshot) => received.set(s.seq, s), () => undefined));
    });
  });

  afterAll(async () => {
    await load?.stop();
    await browser?.close();
  });

  /** The page as it is now (read in one go, between two renders), and the snapshot it shows. */
  async function readPage() {
    const view = await page.evaluate(() => {
      const w = window as unknown as { Chart: { getChart(c: Element | null): { data: { labels?: unknown[]; datasets: { label: string; data: unknown[] }[] } } } };
      const chart = (id: string) => {
        const c = w.Chart.getChart(document.getElementById(id));
        return { labels: c.data.labels ?? [], datasets: c.data.datasets.map((d) => ({ label: d.label, data: d.data })) };
      };
      return {
        seq: Number(document.body.dataset.seq),
        fields: [...document.querySelectorAll<HTMLElement>('[data-field]')].map((e) => ({ field: e.dataset.field!, format: e.dataset.format ?? 'number', text: e.textContent ?? '', value: e.dataset.value ?? '' })),
        prices: chart('prices-chart'),
        breakEven: chart('break-even-chart'),
      };
    });
    await Promise.all(pending);
    const snap = received.get(view.seq);
    expect(snap, `the snapshot #${view.seq} the page shows`).toBeDefined();
    return { view, snap: snap! };
  }

  /** Every figure on the page is the snapshot's, formatted; the charts plot the snapshot. */
  function checkPage({ view, snap }: Awaited<ReturnType<typeof readPage>>) {
    for (const f of view.fields) {
      const value = pick(snap, f.field);
      expect(f.text, f.field).toBe(format(f.format, value));
      expect(f.value, f.field).toBe(JSON.stringify(value ?? null));
    }
    const shown = new Set(view.fields.map((f) => f.field));
    const upm = ['usage', 'allocation'].flatMap((b) => ['input', 'output', 'blended'].map((d) => `cost.usd_per_million_tokens.${b}.${d}`));
    for (const field of ['live.requests_running', 'live.requests_waiting', 'live.output_tokens_per_second', 'cost.utilization', ...upm, 'cost.monthly.fixed_usd', 'cost.api_comparison.0.break_even.tokens_per_month', 'ledger.by_tenant.1.usd.allocation', 'ledger.by_model.0.usd.usage']) {
      expect(shown.has(field), `the page shows ${field}`).toBe(true);
    }
    for (const field of [...upm, 'live.output_tokens_per_second', 'cost.utilization']) expect(pick(snap, field), field).toBeGreaterThan(0);

    // The charts' data is the snapshot's, and the snapshot's charts are its report's figures.
    expect(snap.charts.prices).toEqual(priceBars(snap.cost));
    expect(snap.charts.break_even).toEqual(breakEvenPlot(snap.cost));
    expect(view.prices.labels).toEqual(snap.charts.prices.labels);
    expect(view.prices.datasets.map((d) => d.data)).toEqual([snap.charts.prices.input, snap.charts.prices.output]);
    expect(snap.charts.prices.input.slice(0, 2)).toEqual([snap.cost.usd_per_million_tokens.usage.input, snap.cost.usd_per_million_tokens.allocation.input]);
    const plot = snap.charts.break_even!;
    const byLabel = Object.fromEntries(view.breakEven.datasets.map((d) => [d.label, d.data]));
    expect(byLabel['Self-hosted']).toEqual(plot.self_hosted.map(([x, y]) => ({ x, y })));
    const crossings = snap.cost.api_comparison.filter((a) => a.break_even !== null).map((a) => ({ x: a.break_even!.tokens_per_month, y: a.break_even!.api_usd_per_month }));
    expect(crossings.length).toBeGreaterThan(0);
    expect(byLabel['break-even']).toEqual(crossings);
    for (const a of plot.apis) expect(byLabel[a.label]).toEqual(a.line.map(([x, y]) => ({ x, y })));
  }

  it('shows the figures of the snapshot it rendered, live, and fits 1280×800', async () => {
    load = new Load(server.url, { alice: 3, bob: 1 });
    const t0 = Date.now();
    while (load.done.alice < 8 || load.done.bob < 2) {
      expect(Date.now() - t0, `load errors: ${load.errors.join('; ')}`).toBeLessThan(30_000);
      await new Promise((r) => setTimeout(r, 100));
    }

    await page.goto(`${server.url}/?interval=500`);
    // Keys are on: the page asks for one.
    await page.waitForSelector('#key-form:not([hidden])');
    expect(await page.textContent('#status')).toBe('API key needed');
    await page.fill('#key-input', KEYS.alice);
    await page.click('#key-form button');
    await page.waitForFunction(() => Number(document.body.dataset.seq) >= 3 && document.querySelectorAll('table[data-rows="ledger.by_tenant"] tbody th[data-field]').length === 2);
    expect(await page.textContent('#status')).toBe('live');

    const first = await readPage();
    checkPage(first);
    // Live: later snapshots, with more requests, replace it.
    await page.waitForFunction((seq) => Number(document.body.dataset.seq) >= seq + 3, first.view.seq);
    const later = await readPage();
    checkPage(later);
    expect(later.snap.cost.requests).toBeGreaterThan(first.snap.cost.requests);
    expect([...received.values()].some((s) => s.live.requests_running > 0), 'some snapshot saw requests running').toBe(true);
    expect(later.snap.ledger!.by_tenant.map((r) => r.key)).toEqual(['alice', 'bob']);

    // Readable at 1280×800: nothing wider than the window, the figures and charts in the first screen, no tiny text.
    const layout = await page.evaluate(() => {
      const box = (sel: string) => [...document.querySelectorAll(sel)].map((e) => e.getBoundingClientRect()).map((r) => ({ left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height }));
      const fonts = [...document.querySelectorAll('[data-field]')].map((e) => parseFloat(getComputedStyle(e).fontSize));
      const clipped = [...document.querySelectorAll<HTMLElement>('.panel, .tile')].filter((e) => e.scrollWidth > e.clientWidth).map((e) => e.querySelector('h2')?.textContent);
      return { scrollWidth: document.documentElement.scrollWidth, clipped, tiles: box('.tile'), upm: box('table.upm'), canvases: box('canvas'), minFont: Math.min(...fonts) };
    });
    expect(layout.scrollWidth).toBeLessThanOrEqual(1280);
    expect(layout.clipped, 'panels whose content is wider than they are').toEqual([]);
    expect(layout.tiles).toHaveLength(6);
    for (const r of [...layout.tiles, ...layout.upm, ...layout.canvases]) {
      expect(r.right).toBeLessThanOrEqual(1280);
      expect(r.bottom).toBeLessThanOrEqual(800);
    }
    for (const c of layout.canvases) expect(Math.min(c.width, c.height)).toBeGreaterThan(250);
    expect(layout.minFont).toBeGreaterThanOrEqual(11);

    const png = path.join(OUT, 'dashboard.png');
    await page.screenshot({ path: png });
    expect(fs.statSync(png).size).toBeGreaterThan(30_000);

    // Nothing but this server was asked for anything, and nothing went wrong in the page.
    expect(requested.filter((u) => !u.startsWith(server.url + '/') && !u.startsWith('data:'))).toEqual([]);
    expect(problems).toEqual([]);
    expect(load.errors).toEqual([]);
  });

  it('equals /v1/cost and /metrics at the same moment', async () => {
    await load!.stop();
    expect(load!.errors).toEqual([]);
    const idleAt = new Date().toISOString();
    // The page's next snapshot after the last request, with the ledger tables read after it too.
    await page.waitForFunction((at) => {
      const s = (window as unknown as { tallySnapshot?: { generated_at: string; ledger: { as_of: string } } }).tallySnapshot;
      return s !== undefined && s.generated_at > at && s.ledger.as_of > at;
    }, idleAt, { timeout: 15_000 });

    const shown = await readPage();
    checkPage(shown);
    const s = shown.snap;
    const get = async (p: string) => (await fetch(server.url + p, { headers: auth('bob') })).json();
    const r1 = await get('/v1/cost');
    const metrics = parseMetrics(await (await fetch(`${server.url}/metrics`)).text());
    const r2 = await get('/v1/cost');
    const minute = await get('/v1/cost?window=1m');

    // Same window, same requests.
    expect(r1.window.start).toBe(s.cost.window.start);
    const elapsed = (Date.parse(r1.window.end) - Date.parse(s.generated_at)) / 1000;
    expect(elapsed).toBeGreaterThanOrEqual(0);
    expect(elapsed).toBeLessThan(5);

    // Busy time, tokens, USD on the usage basis, prices, capacity, break-even: equal. What grows with
    // wall-clock time (idle device time, and all that it scales: the allocation factor and basis,
    // utilization, rates per second of window) differs by the time between the two reads, exactly.
    const kWall = r1.usd.wall_clock / s.cost.usd.wall_clock; // wall-clock USD is wall time × the fixed price
    const kWindow = r1.window.seconds / s.cost.window.seconds;
    const rel = (a: number, b: number) => Math.abs(a / b - 1);
    const want = flatten(s.cost);
    const got = flatten(r1);
    expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
    for (const [key, value] of want) {
      const other = got.get(key);
      if (key.startsWith('device_telemetry.') || key.startsWith('energy.') || key === 'window.end') continue; // sampled on their own schedule / the moment itself
      if (key === 'window.seconds' || key === 'device_seconds.wall') expect(Math.abs((other as number) - (value as number) - elapsed), key).toBeLessThan(0.002);
      else if (key === 'device_seconds.idle') expect(Math.abs((other as number) - (value as number) - (r1.device_seconds.wall - s.cost.device_seconds.wall)), key).toBeLessThan(1e-9);
      else if (key === 'usd.wall_clock' || key === 'usd.allocation' || key === 'allocation_factor' || key.startsWith('usd_per_million_tokens.allocation.')) expect(rel((other as number) / (value as number), kWall), key).toBeLessThan(1e-9);
      else if (/^api_comparison\.\d+\.cost_ratio\.allocation$/.test(key)) expect(rel((value as number) / (other as number), kWall), key).toBeLessThan(1e-9);
      else if (key === 'utilization') expect(rel((value as number) / (other as number), r1.device_seconds.wall / s.cost.device_seconds.wall), key).toBeLessThan(1e-9);
      else if (key === 'throughput.tokens_per_second' || key === 'monthly.target_tokens') expect(rel((value as number) / (other as number), kWindow), key).toBeLessThan(1e-9);
      else expect(other, key).toBe(value);
    }
    expect(kWall).toBeGreaterThanOrEqual(1);

    // The last minute's tokens (output tokens/s) are /v1/cost?window=1m's.
    expect(minute.window.start, 'the test must end within a minute of the server start').toBe(s.recent.window.start);
    expect(minute.tokens).toEqual(s.recent.tokens);
    expect(s.live.output_tokens_per_second).toBe(s.recent.tokens.completion / s.recent.window.seconds);

    // /metrics, read between r1 and r2: its gauges are the same window's figures.
    const one = (name: string, labels: Record<string, string> = {}) => {
      const found = metrics.filter((m) => m.name === name && Object.entries(labels).every(([k, v]) => m.labels[k] === v));
      expect(found, `${name} ${JSON.stringify(labels)}`).toHaveLength(1);
      return found[0].value;
    };
    const sum = (name: string, labels: Record<string, string> = {}) => metrics.filter((m) => m.name === name && Object.entries(labels).every(([k, v]) => m.labels[k] === v)).reduce((a, m) => a + m.value, 0);
    expect(one('tally:num_requests_running')).toBe(s.live.requests_running);
    expect(one('tally:num_requests_waiting')).toBe(s.live.requests_waiting);
    expect(s.live.requests_running + s.live.requests_waiting).toBe(0);
    for (const d of ['input', 'output', 'blended'] as const) {
      expect(one('tally:usd_per_million_tokens', { basis: 'usage', direction: d }), `usage ${d}`).toBe(s.cost.usd_per_million_tokens.usage[d]);
      const alloc = one('tally:usd_per_million_tokens', { basis: 'allocation', direction: d });
      expect(alloc, `allocation ${d}`).toBeGreaterThanOrEqual(r1.usd_per_million_tokens.allocation[d] * (1 - 1e-12));
      expect(alloc, `allocation ${d}`).toBeLessThanOrEqual(r2.usd_per_million_tokens.allocation[d] * (1 + 1e-12));
    }
    const util = one('tally:device_utilization');
    expect(util).toBeLessThanOrEqual(r1.utilization * (1 + 1e-12));
    expect(util).toBeGreaterThanOrEqual(r2.utilization * (1 - 1e-12));
    expect(sum('tally:prompt_tokens_total')).toBe(s.cost.tokens.prompt);
    expect(sum('tally:generation_tokens_total')).toBe(s.cost.tokens.completion);
    expect(rel(sum('tally:cost_usd_total', { basis: 'usage' }), s.cost.usd.usage)).toBeLessThan(1e-9);

    // The tables are the ledger's rows, and /metrics' counters by tenant.
    const ledger = new Ledger(path.join(tmp, 'data'), { readonly: true });
    try {
      const since = new Date(s.ledger!.since);
      for (const [by, rows] of [['tenant', s.ledger!.by_tenant], ['model', s.ledger!.by_model]] as const) {
        const direct = ledger.query({ by, since });
        expect(rows.map((r) => [r.key, r.requests, r.prompt_tokens, r.completion_tokens, r.usd.usage, r.usd.allocation])).toEqual(
          direct.map((r) => [r.key, r.requests, r.promptTokens, r.completionTokens, r.usdUsage, r.usdAllocation]),
        );
      }
    } finally {
      ledger.close();
    }
    expect(s.ledger!.by_tenant.map((r) => r.key)).toEqual(['alice', 'bob']);
    for (const row of s.ledger!.by_tenant) {
      expect(sum('tally:request_success_total', { tenant: row.key }), row.key).toBe(row.requests);
      expect(sum('tally:prompt_tokens_total', { tenant: row.key }), row.key).toBe(row.prompt_tokens);
      expect(sum('tally:generation_tokens_total', { tenant: row.key }), row.key).toBe(row.completion_tokens);
      expect(rel(one('tally:cost_usd_total', { tenant: row.key, basis: 'usage' }), row.usd.usage), row.key).toBeLessThan(1e-9);
      expect(rel(one('tally:cost_usd_total', { tenant: row.key, basis: 'allocation' }), row.usd.allocation), row.key).toBeLessThan(1e-9);
    }
    expect(s.ledger!.by_model.map((r) => [r.key, r.requests])).toEqual([['stories260K', s.cost.requests]]);
  });
});
