import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { defaultDataDir } from '../config/serve-config.ts';
import { ledgerRowReport } from '../meter/cost-math.ts';
import { parseDuration } from '../meter/cost-report.ts';
import { LEDGER_FILE, Ledger, type LedgerGroup, type LedgerRow } from '../meter/ledger.ts';

const HELP = `tally cost — what the served requests cost, from the ledger

  --data-dir DIR               the server's data directory (default $TALLY_DATA_DIR or ./.tally)
  --by tenant|model|day        how to group (default tenant; days are UTC)
  --since 24h|2026-11-01       only requests that ended since then: a duration back from now (s, m, h, d)
                               or a date / ISO time (default: everything)
  --format table|json          default table`;

interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

const stdio: Io = { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t) };

/** `tally cost`; returns the exit code. */
export async function runCostCommand(argv: string[], io: Io = stdio, now: () => number = Date.now): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        'data-dir': { type: 'string' },
        by: { type: 'string' },
        since: { type: 'string' },
        format: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }));
  } catch (err) {
    io.err(`${(err as Error).message}\n\n${HELP}\n`);
    return 2;
  }
  if (values.help) {
    io.out(`${HELP}\n`);
    return 0;
  }
  const by = (values.by ?? 'tenant') as LedgerGroup;
  if (!['tenant', 'model', 'day'].includes(by)) return usage(io, `--by must be tenant, model or day (got "${values.by}")`);
  const format = values.format ?? 'table';
  if (format !== 'table' && format !== 'json') return usage(io, `--format must be table or json (got "${values.format}")`);
  let since: Date | undefined;
  if (values.since !== undefined) {
    const back = parseDuration(values.since);
    const at = back !== undefined ? now() - back : Date.parse(values.since);
    if (!Number.isFinite(at)) return usage(io, `--since takes a duration like 24h or a date like 2026-11-01 (got "${values.since}")`);
    since = new Date(at);
  }
  const dataDir = values['data-dir'] ?? defaultDataDir(process.env);
  if (!existsSync(join(dataDir, LEDGER_FILE))) {
    io.err(`tally cost: no ledger at ${join(dataDir, LEDGER_FILE)} (serve with --data-dir ${dataDir} first)\n`);
    return 1;
  }

  const ledger = new Ledger(dataDir, { readonly: true });
  let rows: LedgerRow[];
  try {
    rows = ledger.query({ by, since });
  } finally {
    ledger.close();
  }
  const total = rows.reduce<LedgerRow>(
    (a, r) => ({
      key: 'total',
      requests: a.requests + r.requests,
      cancelled: a.cancelled + r.cancelled,
      promptTokens: a.promptTokens + r.promptTokens,
      cachedTokens: a.cachedTokens + r.cachedTokens,
      completionTokens: a.completionTokens + r.completionTokens,
      prefillDeviceSeconds: a.prefillDeviceSeconds + r.prefillDeviceSeconds,
      decodeDeviceSeconds: a.decodeDeviceSeconds + r.decodeDeviceSeconds,
      usdUsage: a.usdUsage + r.usdUsage,
      usdAllocation: a.usdAllocation + r.usdAllocation,
    }),
    { key: 'total', requests: 0, cancelled: 0, promptTokens: 0, cachedTokens: 0, completionTokens: 0, prefillDeviceSeconds: 0, decodeDeviceSeconds: 0, usdUsage: 0, usdAllocation: 0 },
  );

  if (format === 'json') {
    io.out(`${JSON.stringify({ by, since: since?.toISOString() ?? null, rows: rows.map(ledgerRowReport), total: ledgerRowReport(total) }, null, 2)}\n`);
  } else {
    io.out(table(by, rows, total));
  }
  return 0;
}

function usage(io: Io, message: string): number {
  io.err(`${message}\n\n${HELP}\n`);
  return 2;
}

function usd(x: number | null): string {
  if (x === null) return '-';
  return x >= 1 ? x.toFixed(2) : x.toPrecision(3);
}

function table(by: LedgerGroup, rows: LedgerRow[], total: LedgerRow): string {
  const head = [by.toUpperCase(), 'REQUESTS', 'CANCELLED', 'PROMPT TOK', 'CACHED TOK', 'HIT RATE', 'COMPL TOK', 'PREFILL DEV-S', 'DECODE DEV-S', 'USD USAGE', 'USD ALLOC', '$/M USAGE', '$/M ALLOC'];
  const line = (r: LedgerRow) => {
    const j = ledgerRowReport(r);
    return [
      j.key,
      String(j.requests),
      String(j.cancelled),
      String(j.prompt_tokens),
      String(j.cached_prompt_tokens),
      j.prefix_cache_hit_rate === null ? '-' : `${(j.prefix_cache_hit_rate * 100).toFixed(1)}%`,
      String(j.completion_tokens),
      j.device_seconds.prefill.toFixed(3),
      j.device_seconds.decode.toFixed(3),
      usd(j.usd.usage),
      usd(j.usd.allocation),
      usd(j.usd_per_million_tokens.usage),
      usd(j.usd_per_million_tokens.allocation),
    ];
  };
  const body = [head, ...rows.map(line), line(total)];
  const widths = head.map((_, i) => Math.max(...body.map((cells) => cells[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  return [fmt(head), ...rows.map((r) => fmt(line(r))), rule, fmt(line(total))].join('\n') + '\n';
}
