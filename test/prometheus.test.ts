/**
 * deploy/prometheus.yml, the recording rules of deploy/prometheus/tally-rules.yml and the Grafana
 * dashboard deploy/grafana/tally.json, against a real Prometheus (Debian's package: /usr/bin/prometheus,
 * or $PROMETHEUS_PATH) scraping two real Tally replicas under load every second. The replicas have
 * different device prices, so the fleet's $/M tokens is a token-weighted mix that a plain average of the
 * replicas' figures would miss. Through Prometheus' HTTP API: the per-replica and fleet recording rules
 * give the $/M tokens that the replicas report in GET /v1/cost over the same requests, and every query of
 * the Grafana dashboard runs and returns data.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { streamLoad } from '../bench/http-load.ts';
import {  type RunningServer } from '../src/server/start.ts';
import { Metrics } from '../src/telemetry/metrics.ts';
import { storiesModel } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const PROMETHEUS = process.env.PROMETHEUS_PATH ?? '/usr/bin/prometheus';
const PROMTOOL = process.env.PROMTOOL_PATH ?? '/usr/bin/promtool';
const HAVE_PROMETHEUS = fs.existsSync(PROMETHEUS);
const HAVE_PROMTOOL = fs.existsSync(PROMTOOL);
const NO_PROMETHEUS = `SKIPPED: no Prometheus at ${PROMETHEUS} (apt-get install -y prometheus, or set PROMETHEUS_PATH)`;
const NO_PROMTOOL = `SKIPPED: no promtool at ${PROMTOOL} (apt-get install -y prometheus, or set PROMTOOL_PATH)`;
if (!HAVE_PROMETHEUS) console.warn(`test/prometheus.test.ts: ${NO_PROMETHEUS}`);

// CI installs Prometheus (.ci/run): there these tests must run, not skip.
describe.runIf(process.env.CI === 'true')('in CI', () => {
  it('has Prometheus and promtool to test against', () => {
    expect(HAVE_PROMETHEUS, NO_PROMETHEUS).toBe(true);
    expect(HAVE_PROMTOOL, NO_PROMTOOL).toBe(true);
  });
});

const DEPLOY = path.resolve('deploy');
const CONFIG = path.join(DEPLOY, 'prometheus.yml');
const RULES = path.join(DEPLOY, 'prometheus', 'tally-rules.yml');
const GRAFANA = path.join(DEPLOY, 'grafana', 'tally.json');

type Basis = 'usage' | 'allocation';
type Direction = 'input' | 'output' | 'blended';
const BASES: Basis[] = ['usage', 'allocation'];
const DIRECTIONS: Direction[] = ['input', 'output', 'blended'];

interface GrafanaTarget {
  expr: string;
  datasource?: { uid?: string };
}
interface GrafanaPanel {
  type: string;
  title: string;
  targets?: GrafanaTarget[];
  datasource?: { uid?: string };
}
const grafana = JSON.parse(fs.readFileSync(GRAFANA, 'utf8')) as { uid: string; panels: GrafanaPanel[]; templating: { list: { name: string }[] } };
const grafanaTargets = grafana.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, ...t })));

interface Rule {
  record: string;
  expr: string;
  labels?: Record<string, string>;
}
const rules = (YAML.parse(fs.readFileSync(RULES, 'utf8')) as { groups: { name: string; rules: Rule[] }[] }).groups.flatMap((g) => g.rules);

/** A Grafana query as Prometheus takes it: dashboard variables and Grafana's own intervals filled in. */
function grafanaQuery(expr: string): string {
  return expr.replaceAll('$__rate_interval', '1m').replaceAll('$__range', '5m').replaceAll('$job', '.+').replaceAll('$instance', '.+');
}

describe('deploy files', () => {
  it('the rules record $/M tokens per replica and for the fleet, by basis and direction, as Tally labels its gauge', () => {
    for (const level of ['instance', 'job']) {
      const found = rules.filter((r) => r.record === `${level}:tally_usd_per_million_tokens:rate1m`).map((r) => `${r.labels?.basis}/${r.labels?.direction}`);
      expect(found.sort()).toEqual(BASES.flatMap((b) => DIRECTIONS.map((d) => `${b}/${d}`)).sort());
    }
  });

  it.skipIf(!HAVE_PROMTOOL)(`promtool accepts the rules and the scrape config${HAVE_PROMTOOL ? '' : ` — ${NO_PROMTOOL}`}`, () => {
    for (const args of [['check', 'rules', RULES], ['check', 'config', CONFIG]]) {
      const run = spawnSync(PROMTOOL, args, { encoding: 'utf8' });
      expect(run.status, `promtool ${args.join(' ')}:\n${run.stdout}${run.stderr}`).toBe(0);
    }
  });

  it('the Grafana dashboard has the panels and queries only what Tally exports or the rules record', () => {
    const titles = grafana.panels.map((p) => p.title.toLowerCase());
    for (const want of ['throughput', 'latency percentiles', '$/m tokens by basis', 'utilization', 'cost by tenant']) {
      expect(titles.some((t) => t.includes(want)), want).toBe(true);
    }
    expect(grafana.templating.list.map((v) => v.name)).toEqual(expect.arrayContaining(['datasource', 'job', 'instance']));
    const exported = new Set<string>();
    for (const m of new Metrics().registry.getMetricsAsArray()) {
      const name = (m as unknown as { name: string }).name;
      exported.add(name);
      for (const suffix of ['_bucket', '_sum', '_count']) exported.add(name + suffix);
    }
    const recorded = new Set(rules.map((r) => r.record));
    expect(grafanaTargets.length).toBeGreaterThan(10);
    for (const t of grafanaTargets) {
      expect(t.datasource?.uid, t.panel).toBe('${datasource}');
      const names = t.expr.match(/\b(?:tally|instance|job):[a-z_:0-9]+/g) ?? [];
      expect(names.length, `${t.panel}: ${t.expr}`).toBeGreaterThan(0);
      for (const name of names) expect(exported.has(name) || recorded.has(name), `${t.panel}: ${name}`).toBe(true);
    }
  });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

describe.skipIf(!HAVE_PROMETHEUS)(`Prometheus scraping two Tally replicas${HAVE_PROMETHEUS ? '' : ` — ${NO_PROMETHEUS}`}`, () => {
  const PRICES = ['0.5', '3']; // USD per device-hour of the two replicas
  const WARMUP = 40; // requests per replica before Prometheus starts
  const LOAD = 120; // requests per replica while it scrapes
  const body = (i: number) => ({ model: 'stories260K', prompt: `Once upon a time, ${['a cat', 'a dog', 'a girl named Lily', 'the sun'][i % 4]}`, max_tokens: 16 + (i % 5) * 12, temperature: 0.8, seed: i });
  let tmp: string;
  let replicas: RunningServer[] = [];
  let prometheus: ChildProcess | undefined;
  let promUrl: string;
  let promStartS: number;
  let promLog = '';

  type Sample = { metric: Record<string, string>; value: [number, string]; values?: [number, string][] };
  async function promQuery(query: string, time?: number): Promise<Sample[]> {
    const url = new URL('/api/v1/query', promUrl);
    url.searchParams.set('query', query);
    if (time !== undefined) url.searchParams.set('time', String(time));
    const res = await fetch(url);
    const body = (await res.json()) as { status: string; error?: string; data: { result: Sample[] } };
    if (body.status !== 'success') throw new Error(`${query}: ${body.error}`);
    return body.data.result;
  }

  async function until(what: string, test: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await test().catch(() => false))) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\nprometheus log:\n${promLog.slice(-3000)}`);
      await sleep(250);
    }
  }

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-prom-'));
    const model = storiesModel();
    replicas = await Promise.all(
      PRICES.map((price, i) => startServerWith({ model, host: '127.0.0.1', port: 0, device: 'cpu', threads: 1, dataDir: path.join(tmp, `data-${i}`), logLevel: 'silent', devicePrice: price })),
    );
    // Traffic before Prometheus starts: Tally's labelled counters appear with a replica's first request,
    // and their first samples must already hold a good part of the later increase (see the tolerance below).
    for (const load of await Promise.all(replicas.map((r) => streamLoad(r.url, body, 4, WARMUP)))) expect(load.errors).toBe(0);

    // deploy/prometheus.yml with a 1 s scrape and evaluation interval, these replicas as the targets,
    // and the rules file by absolute path.
    const config = YAML.parse(fs.readFileSync(CONFIG, 'utf8'));
    config.global = { ...config.global, scrape_interval: '1s', evaluation_interval: '1s' };
    config.rule_files = (config.rule_files as string[]).map((f) => path.resolve(DEPLOY, f));
    const job = (config.scrape_configs as { job_name: string; static_configs: { targets: string[] }[] }[]).find((j) => j.job_name === 'tally')!;
    job.static_configs = [{ targets: replicas.map((r) => new URL(r.url).host) }];
    const configFile = path.join(tmp, 'prometheus.yml');
    fs.writeFileSync(configFile, YAML.stringify(config));

    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    promStartS = Date.now() / 1000;
    prometheus = spawn(PROMETHEUS, [`--config.file=${configFile}`, `--storage.tsdb.path=${path.join(tmp, 'tsdb')}`, `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
    prometheus.stdout!.on('data', (d) => (promLog += d));
    prometheus.stderr!.on('data', (d) => (promLog += d));
    await until('Prometheus to be ready', async () => (await fetch(`${promUrl}/-/ready`)).ok);
  });

  afterAll(async () => {
    if (prometheus && prometheus.exitCode === null) {
      const exited = new Promise((r) => prometheus!.once('exit', r));
      prometheus.kill('SIGTERM');
      await Promise.race([exited, sleep(5000)]);
      if (prometheus.exitCode === null) prometheus.kill('SIGKILL');
    }
    await Promise.all(replicas.map((r) => r.shutdown(1)));
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('the recording rules give the $/M tokens the replicas report, and every Grafana query returns data', async () => {
    await until('both replicas scraped twice', async () => (await promQuery('count(count_over_time(tally:prompt_tokens_total{job="tally"}[1m]) >= 2)'))[0]?.value[1] === '2');
    // Tally's windows start at a whole second: keep the warm-up out of the window that holds the load.
    await sleep(2000);

    const loadStart = Date.now();
    for (const load of await Promise.all(replicas.map((r) => streamLoad(r.url, body, 4, LOAD)))) expect(load.errors).toBe(0);
    // Two more scrapes and rule evaluations after the last request.
    await sleep(2600);

    // What each replica reports for the load: /v1/cost over a window that starts within 2 s before it.
    const windowS = Math.ceil((Date.now() - loadStart) / 1000);
    const reports = await Promise.all(replicas.map(async (r) => (await fetch(`${r.url}/v1/cost?window=${windowS}s`)).json()));
    for (const report of reports) expect(report.requests, 'the window holds the load and not the warm-up').toBe(LOAD);

    // The rules' latest evaluation; everything below is read at that instant.
    const [stamp] = await promQuery('timestamp(job:tally_usd_per_million_tokens:rate1m{job="tally", basis="usage", direction="output"})');
    const te = Number(stamp.value[1]);
    // Prometheus started after the warm-up, so every sample in the rules' 1 m range is after it.
    expect(te - promStartS, 'the test must finish within the rules 1 m range').toBeLessThan(58);
    const at = async (query: string, instance?: string) => {
      const found = (await promQuery(query, te)).filter((s) => instance === undefined || s.metric.instance === instance);
      expect(found, `${query} ${instance ?? ''}`).toHaveLength(1);
      return Number(found[0].value[1]);
    };

    // Exact but for floating point. rate() extrapolates each counter from its first and last samples in
    // the range to the range's edges; a replica's counters are scraped together, so they share the factor
    // and it cancels in every per-replica ratio, unless a counter's first sample is so small against its
    // increase that Prometheus stops its extrapolation at zero. The warm-up (a third of the load) keeps every
    // counter's first sample well above that. The fleet sums rates, so each replica's share of it carries
    // that replica's factor (its scrapes fall at other instants), as it would in production: the fleet's
    // expected figure weights each replica's own $/M by the token rate Prometheus has for it.
    const EXACT = 1e-6;
    const close = (got: number, want: number, what: string) => expect(Math.abs(got / want - 1), `${what}: rule ${got}, expected ${want}`).toBeLessThan(EXACT);
    const tokensOf = (d: Direction) => (d === 'input' ? 'prompt' : d === 'output' ? 'completion' : 'total');

    const perReplica = await Promise.all(
      replicas.map(async (r, i) => {
        const host = new URL(r.url).host;
        const report = reports[i];
        // F = wall / busy device time between the first and last samples the rule saw: busy is the load's
        // (Tally's report), wall is Tally's own wall-clock counter as scraped. The newest sample may have
        // been stored just after the rule ran, so the rule saw all samples up to it or all but it.
        const factor = await at('instance:tally_allocation_factor:ratio_rate1m', host);
        const [wallSeries] = await promQuery(`tally:device_wall_seconds_total{instance="${host}"}[1m]`, te);
        const walls = wallSeries.values!.map(([, v]) => Number(v));
        const candidates = [walls.length - 1, walls.length - 2].map((k) => Math.max(1, (walls[k] - walls[0]) / report.device_seconds.busy));
        expect(candidates.some((c) => Math.abs(factor / c - 1) < EXACT), `${host}: F ${factor}, Tally's wall/busy ${candidates}`).toBe(true);
        close(await at('instance:tally_device_utilization:ratio_rate1m', host), 1 / factor, `${host} utilization`);

        const tokenRate = { input: await at('instance:tally_prompt_tokens:rate1m', host), output: await at('instance:tally_generation_tokens:rate1m', host), blended: 0 };
        tokenRate.blended = tokenRate.input + tokenRate.output;
        const upm = {} as Record<Basis, Record<Direction, number>>;
        for (const b of BASES) {
          upm[b] = {} as Record<Direction, number>;
          for (const d of DIRECTIONS) {
            upm[b][d] = report.usd_per_million_tokens.usage[d] * (b === 'allocation' ? factor : 1);
            expect(report.tokens[tokensOf(d)]).toBeGreaterThan(0);
            close(await at(`instance:tally_usd_per_million_tokens:rate1m{basis="${b}", direction="${d}"}`, host), upm[b][d], `${host} ${b} ${d}`);
          }
        }
        return { host, upm, tokenRate };
      }),
    );

    const fleet: Record<string, number> = {};
    for (const b of BASES) {
      for (const d of DIRECTIONS) {
        const got = await at(`job:tally_usd_per_million_tokens:rate1m{job="tally", basis="${b}", direction="${d}"}`);
        const want = perReplica.reduce((s, p) => s + p.upm[b][d] * p.tokenRate[d], 0) / perReplica.reduce((s, p) => s + p.tokenRate[d], 0);
        close(got, want, `fleet ${b} ${d}`);
        // A token-weighted mix of the replicas, between them.
        const [lo, hi] = perReplica.map((p) => p.upm[b][d]).sort((x, y) => x - y);
        expect(got).toBeGreaterThan(lo);
        expect(got).toBeLessThan(hi);
        fleet[`${b} ${d}`] = got;
      }
    }
    console.log('fleet $/M tokens (recording rules):', JSON.stringify(fleet), 'replicas:', JSON.stringify(perReplica));

    // Every query of the Grafana dashboard runs and has data.
    for (const target of grafanaTargets) {
      const result = await promQuery(grafanaQuery(target.expr), te);
      expect(result.length, `${target.panel}: ${target.expr}`).toBeGreaterThan(0);
      for (const r of result) expect(Number.isNaN(Number(r.value[1])), `${target.panel}: ${target.expr} gives NaN`).toBe(false);
    }
  });
});
