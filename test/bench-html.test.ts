/**
 * The HTML report opens in headless Chromium (Debian's /usr/bin/chromium, or $CHROMIUM_PATH) and its
 * plots render: each SVG has a nonzero size and one mark per data point, bar and break-even crossing.
 */
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runBenchCommand } from '../src/loadgen/bench-cli.ts';
import type { BenchResult } from '../src/loadgen/run.ts';
import { startStandIn, type StandIn } from './helpers/stand-in-server.ts';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
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
    expect(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install -y chromium, or set CHROMIUM_PATH`).toBe(true);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--no-sandbox', '--headless', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
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
