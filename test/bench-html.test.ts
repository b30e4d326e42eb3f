/**
 * The HTML reports open in headless Chromium (test/helpers/browser.ts) and their plots render: each SVG
 * has a nonzero size and one mark per data point, bar and break-even crossing. The single-server report
 * against a stand-in; the two-server comparison of Tally (stories260K) against a stand-in that closes
 * every connection after its response, as llama.cpp's server does.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runBenchCommand } from '../src/cli/bench.ts';
import type { CompareResult } from '../src/loadgen/compare.ts';
import type { BenchResult } from '../src/loadgen/run.ts';
import type { RunningServer } from '../src/server/start.ts';
import { launchBrowser } from './helpers/browser.ts';
import { storiesModel } from './helpers/models.ts';
import { startStandIn, type StandIn } from './helpers/stand-in-server.ts';
import { startServerWith } from './helpers/server.ts';

const OUT = path.resolve('test-output');
const API_MODELS = ['openai:gpt-6-sol', 'anthropic:claude-haiku-4-5', 'google:gemini-3.5-flash-lite', 'openai:gpt-6-luna'];

let server: StandIn;
let result: BenchResult;
let htmlFile: string;

beforeAll(async () => {
  fs.mkdirSync(OUT, { recursive: true });
  server = await startStandIn({ ttftMs: 20, itlMs: 4, cost: { prefillPerToken: 0.0002, decodePerToken: 0.002 } });
  htmlFile = path.join(OUT, 'bench-report.html');
  const json = path.join(OUT, 'bench-report.json');
  const code = await runBenchCommand(
    ['--url', server.url, '--concurrency', '1,4,8', '--rate', '20,inf', '--requests', '8', '--input-len', '64', '--output-len', '16', '--warmup', '0', '--device-price', '0.5', '--api-models', API_MODELS.join(','), '--json', json, '--html', htmlFile],
    { out: () => undefined, err: { write: () => true, isTTY: false } },
  );
  expect(code).toBe(0);
  result = JSON.parse(fs.readFileSync(json, 'utf8')) as BenchResult;
});

afterAll(async () => {
  await server?.close();
});

describe('HTML report', () => {
  it('is self-contained', () => {
    const html = fs.readFileSync(htmlFile, 'utf8');
    expect(html).not.toMatch(/<script|<link|https?:\/\/(?!127\.0\.0\.1)(?!www\.w3\.org\/2000\/svg)/);
  });

  it('renders every plot in headless Chromium', async () => {
    const browser = await launchBrowser();
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
      const requests: string[] = [];
      page.on('request', (r) => requests.push(r.url()));
      await page.goto(`file://${htmlFile}`);
      // Nothing but the file itself is loaded.
      expect(requests.filter((u) => !u.startsWith('file://'))).toEqual([]);

      const plots = await page.$$eval('svg[data-plot]', (svgs) =>
        svgs.map((s) => {
          const box = s.getBoundingClientRect();
          const marks = (sel: string) => [...s.querySelectorAll(sel)].filter((e) => {
            const b = e.getBoundingClientRect();
            return b.width > 0 && b.height > 0;
          }).length;
          return { name: s.getAttribute('data-plot')!, width: box.width, height: box.height, points: marks('circle.pt'), bars: marks('rect.bar'), lines: marks('path.line'), crosses: marks('circle.cross') };
        }),
      );
      const byName = Object.fromEntries(plots.map((p) => [p.name, p]));
      expect(Object.keys(byName).sort()).toEqual(['cost', 'itl-concurrency', 'itl-rate', 'monthly', 'throughput-concurrency', 'throughput-rate', 'ttft-concurrency', 'ttft-rate']);
      for (const p of plots) {
        expect(p.width, p.name).toBeGreaterThan(100);
        expect(p.height, p.name).toBeGreaterThan(100);
      }
      const conc = result.points.filter((p) => p.mode === 'concurrency').length;
      const rate = result.points.filter((p) => p.mode === 'rate').length;
      expect([conc, rate]).toEqual([3, 2]);
      // Two throughput series, one latency series per percentile, one mark per load point each.
      expect(byName['throughput-concurrency'].points).toBe(2 * conc);
      expect(byName['throughput-rate'].points).toBe(2 * rate);
      expect(byName['ttft-concurrency'].points).toBe(3 * conc);
      expect(byName['itl-rate'].points).toBe(3 * rate);
      expect(byName['ttft-concurrency'].lines).toBe(3);
      // A bar per load point (wall clock), per load point (server-metered) and per priced API model.
      const priced = result.points[0].cost.api.filter((a) => a.blended_usd_per_million !== null).length;
      expect(priced).toBe(API_MODELS.length);
      expect(byName.cost.bars).toBe(2 * result.points.length + priced);
      // The devices' staircase, a line per API, and a circle where each cheaper-than-API line crosses.
      const ref = [...result.points].sort((a, b) => a.cost.usd_per_million.blended! - b.cost.usd_per_million.blended!)[0];
      const crossings = ref.cost.api.filter((a) => a.break_even !== null).length;
      expect(crossings).toBeGreaterThan(0);
      expect(byName.monthly.lines).toBe(1 + priced);
      expect(byName.monthly.crosses).toBe(crossings);

      // The values plotted are the report's.
      const ys = await page.$$eval('svg[data-plot="throughput-concurrency"] circle.pt[data-series="output tokens/s"]', (cs) => cs.map((c) => Number(c.getAttribute('data-y'))));
      expect(ys).toEqual(result.points.filter((p) => p.mode === 'concurrency').map((p) => p.stats.throughput.output_tokens_per_s));

      await page.screenshot({ path: path.join(OUT, 'bench-report.png'), fullPage: true });
      expect(fs.statSync(path.join(OUT, 'bench-report.png')).size).toBeGreaterThan(10_000);
    } finally {
      await browser.close();
    }
  });
});

describe('comparison report: Tally against a connection-dropping stand-in', () => {
  let tally: RunningServer;
  let peer: StandIn;
  let cmp: CompareResult;
  let cmpHtml: string;

  beforeAll(async () => {
    tally = await startServerWith({ model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', dataDir: fs.mkdtempSync(path.join(OUT, 'tally-data-')), logLevel: 'silent', devicePrice: '2' });
    peer = await startStandIn({ ttftMs: 5, itlMs: 2, model: 'stories260K', connection: 'close' });
    cmpHtml = path.join(OUT, 'bench-compare.html');
    const json = path.join(OUT, 'bench-compare.json');
    const code = await runBenchCommand(
      ['--url', tally.url, '--url', peer.url, '--name', 'tally', '--name', 'llama-like', '--device-price', 'cpu-2core', '--device-price', '0.5', '--model', 'stories260K', '--concurrency', '1,4', '--rate', '30', '--requests', '8', '--input-len', '16', '--output-len', '12', '--warmup', '1', '--api-models', API_MODELS.slice(0, 2).join(','), '--json', json, '--html', cmpHtml],
      { out: () => undefined, err: { write: () => true, isTTY: false } },
    );
    expect(code).toBe(0);
    cmp = JSON.parse(fs.readFileSync(json, 'utf8')) as CompareResult;
  });

  afterAll(async () => {
    await peer?.close();
    await tally?.shutdown(1);
  });

  it('measures both without an error, every requested token counted', () => {
    expect(cmp.runs.map((r) => r.target.name)).toEqual(['tally', 'llama-like']);
    for (const run of cmp.runs) {
      for (const p of run.points) {
        expect(p.stats.requests).toEqual({ sent: 8, completed: 8, failed: 0 });
        expect(p.stats.tokens.output).toBe(8 * 12);
        expect(p.stats.asked!.short).toBe(0);
      }
    }
    expect(cmp.runs[0].server.reports_cost).toBe(true);
  });

  it('is self-contained and renders both servers in headless Chromium', async () => {
    const html = fs.readFileSync(cmpHtml, 'utf8');
    expect(html).not.toMatch(/<script|<link|https?:\/\/(?!127\.0\.0\.1)(?!www\.w3\.org\/2000\/svg)/);
    const browser = await launchBrowser();
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
      const requests: string[] = [];
      page.on('request', (r) => requests.push(r.url()));
      await page.goto(`file://${cmpHtml}`);
      expect(requests.filter((u) => !u.startsWith('file://'))).toEqual([]);
      const plots = await page.$$eval('svg[data-plot]', (svgs) =>
        svgs.map((s) => {
          const box = s.getBoundingClientRect();
          const visible = (sel: string) => [...s.querySelectorAll(sel)].filter((e) => {
            const b = e.getBoundingClientRect();
            return b.width > 0 && b.height > 0;
          });
          return { name: s.getAttribute('data-plot')!, width: box.width, height: box.height, series: [...new Set(visible('circle.pt').map((c) => c.getAttribute('data-series')))], points: visible('circle.pt').length, bars: visible('rect.bar').length };
        }),
      );
      const byName = Object.fromEntries(plots.map((p) => [p.name, p]));
      expect(Object.keys(byName).sort()).toEqual(['cost', 'throughput-concurrency', 'throughput-rate', 'ttft-concurrency', 'ttft-rate', 'usd-concurrency', 'usd-rate']);
      for (const p of plots) {
        expect(p.width, p.name).toBeGreaterThan(100);
        expect(p.height, p.name).toBeGreaterThan(100);
      }
      // One series per server, one mark per load point each.
      for (const name of ['throughput-concurrency', 'ttft-concurrency', 'usd-concurrency']) {
        expect(byName[name].series).toEqual(['tally', 'llama-like']);
        expect(byName[name].points).toBe(2 * 2);
      }
      expect(byName['usd-rate'].points).toBe(2);
      // A bar per server (at its cheapest point) and per priced API model.
      expect(byName.cost.bars).toBe(2 + 2);
      // The plotted values are the report's.
      const ys = await page.$$eval('svg[data-plot="usd-concurrency"] circle.pt[data-series="llama-like"]', (cs) => cs.map((c) => Number(c.getAttribute('data-y'))));
      expect(ys).toEqual(cmp.runs[1].points.filter((p) => p.mode === 'concurrency').map((p) => p.cost.usd_per_million.blended));
      // The side-by-side table has a row per server per load point, with the ratio over the first.
      const rows = await page.$$eval('h2 + table tbody tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent)));
      const side = rows.filter((r) => r.length === 15);
      expect(side).toHaveLength(2 * 3);
      const ratio = cmp.rows[0].servers[1]!.ratio!.usd_per_million_blended!;
      expect(side[1][14]).toBe(`${ratio.toPrecision(3)}×`);
      await page.screenshot({ path: path.join(OUT, 'bench-compare.png'), fullPage: true });
      expect(fs.statSync(path.join(OUT, 'bench-compare.png')).size).toBeGreaterThan(10_000);
    } finally {
      await browser.close();
    }
  });
});
