/**
 * Kill tests, with the ledger checked against the responses received: a crashed engine worker (its requests
 * fail with 500, it restarts, the server goes on), and kill -9 of the whole server under load, repeated: every
 * response that completed is in the ledger exactly once and the SQLite file stays sound.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { Ledger } from '../src/meter/ledger.ts';
import { storiesModel } from './helpers/models.ts';
import { FAULT_WORKER, injectFault, startServerWith } from './helpers/server.ts';

const tmp = (prefix: string) => fs.mkdtempSync(path.join(os.tmpdir(), prefix));

interface Answer {
  /** The ledger id: the response's id, else `cmpl-` + x-request-id. */
  id: string;
  status: number;
  /** Whole and ended normally: a JSON body with usage, or a stream that reached [DONE] without an error. */
  completed: boolean;
  completionTokens?: number;
  text: string;
}

/** One completion request, whole or streamed, read to the end; undefined if the connection broke. */
async function complete(url: string, body: Record<string, unknown>, signal?: AbortSignal): Promise<Answer | undefined> {
  try {
    const payload = body.stream ? { ...body, stream_options: { include_usage: true } } : body;
    const r = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload), signal });
    const text = await r.text();
    const id = `cmpl-${r.headers.get('x-request-id')}`;
    if (!body.stream) {
      const json = JSON.parse(text);
      return { id, status: r.status, completed: r.status === 200, completionTokens: json.usage?.completion_tokens, text };
    }
    const events = text.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
    const error = events.some((e) => e.startsWith('{"error"'));
    const usage = events.map((e) => (e === '[DONE]' ? undefined : JSON.parse(e).usage)).find((u) => u);
    return { id, status: r.status, completed: r.status === 200 && events.at(-1) === '[DONE]' && !error, completionTokens: usage?.completion_tokens, text };
  } catch {
    return undefined;
  }
}

function ledgerRows(dataDir: string): Map<string, { status: string; completionTokens: number }> {
  const db = new Database(path.join(dataDir, 'ledger.sqlite'), { readonly: true });
  const rows = db.prepare('SELECT id, status, completion_tokens AS completionTokens FROM requests').all() as { id: string; status: string; completionTokens: number }[];
  db.close();
  return new Map(rows.map((r) => [r.id, r]));
}

describe('engine worker crash', () => {
  it('fails the requests in flight with 500 and a clear message, restarts the worker, serves on; the ledger matches', async () => {
    const dataDir = tmp('tally-kill-worker-');
    const logs: Record<string, unknown>[] = [];
    const s = await startServerWith(
      { model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', dataDir, logLevel: 'info', maxNumSeqs: 8, kvCacheGb: 0.25, threads: 1 },
      pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) }),
      FAULT_WORKER,
    );
    const answers: Answer[] = [];
    try {
      const long = { prompt: 'Once upon a time', max_tokens: 1500, ignore_eos: true };
      for (const [fault, message] of [['exit', 'engine worker exited (code 1)'], ['throw', 'engine worker crashed (injected worker crash)']] as const) {
        const restarts = s.engine.restarts;
        const inFlight = [complete(s.url, long), complete(s.url, { ...long, stream: true }), complete(s.url, { ...long, n: 2 }), complete(s.url, { ...long, stream: true, n: 3 })];
        const deadline = Date.now() + 3000;
        while (s.engine.inFlight < 7 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
        await new Promise((r) => setTimeout(r, 100));
        const restarting = once(s.engine, 'restart');
        injectFault(fault);
        // Submitted once the worker has died, while the new one loads: it waits for it.
        await restarting;
        const during = complete(s.url, { prompt: 'Once upon a time', max_tokens: 8 });
        const failed = (await Promise.all(inFlight)).map((a) => a!);
        for (const a of failed) {
          expect(a.completed).toBe(false);
          expect(a.text).toContain(message);
          expect(a.text).toContain('restarting');
          if (a.status !== 200) expect(JSON.parse(a.text).error).toMatchObject({ type: 'server_error', code: 'internal_error' });
        }
        expect(failed.map((a) => a.status)).toEqual([500, 200, 500, 200]);
        const after = (await during)!;
        expect(after.completed).toBe(true);
        expect(s.engine.restarts).toBe(restarts + 1);
        answers.push(...failed, after);
      }
      const again = (await complete(s.url, { prompt: 'Once upon a time', max_tokens: 8, stream: true }))!;
      expect(again.completed).toBe(true);
      answers.push(again);
      expect(logs.filter((l) => l.msg === 'engine worker restarted').length).toBe(2);
    } finally {
      await s.shutdown(1);
    }
    const rows = ledgerRows(dataDir);
    expect(rows.size).toBe(answers.length);
    for (const a of answers) {
      const row = rows.get(a.id);
      expect(row?.status, a.id).toBe(a.completed ? 'completed' : 'error');
      if (a.completed) expect(row!.completionTokens).toBe(a.completionTokens);
    }
  });
});

describe('kill -9 of the whole server under load', () => {
  /** `tally serve` as a child; resolves with its URL once it serves. */
  async function serve(dataDir: string): Promise<{ child: ChildProcess; url: string; exited: Promise<number | null> }> {
    const child = spawn(
      process.execPath,
      ['bin/tally.js', 'serve', '--model', storiesModel(), '--port', '0', '--data-dir', dataDir, '--max-num-seqs', '8', '--kv-cache-gb', '0.25', '--threads', '1'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    let out = '';
    const url = await new Promise<string>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /"url":"(http:[^"]+)".*"msg":"serving"/.exec(out);
        if (m) resolve(m[1]);
      });
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      child.on('exit', (code) => reject(new Error(`tally serve exited (${code}): ${out}`)));
    });
    return { child, url, exited };
  }

  it('loses no completed response and counts none twice, over repeated kills; the file stays sound', async () => {
    const dataDir = tmp('tally-kill-proc-');
    const answers: Answer[] = [];
    let sent = 0;
    let seed = 7;
    const rand = () => ((seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) / 2 ** 31);
    for (let round = 0; round < 4; round++) {
      const { child, url, exited } = await serve(dataDir);
      expect(new URL(url).hostname).toBe('127.0.0.1');
      const controller = new AbortController();
      let killed = false;
      const client = async () => {
        while (!killed) {
          sent++;
          const a = await complete(url, { prompt: 'Once upon a time', max_tokens: 5 + Math.floor(rand() * 80), ignore_eos: true, stream: rand() < 0.5 }, controller.signal);
          if (a) answers.push(a);
        }
      };
      const clients = Array.from({ length: 8 }, client);
      await new Promise((r) => setTimeout(r, 300 + rand() * 1200));
      child.kill('SIGKILL');
      killed = true;
      expect(await exited).toBe(null);
      controller.abort();
      await Promise.all(clients);
    }

    const completed = answers.filter((a) => a.completed);
    expect(completed.length).toBeGreaterThan(20);
    const ledger = new Ledger(dataDir);
    expect(ledger.integrityCheck()).toBe('ok');
    ledger.close();
    const db = new Database(path.join(dataDir, 'ledger.sqlite'), { readonly: true });
    const { n, distinct } = db.prepare('SELECT count(*) AS n, count(DISTINCT id) AS "distinct" FROM requests').get() as { n: number; distinct: number };
    db.close();
    expect(n).toBe(distinct);
    expect(n).toBeLessThanOrEqual(sent);
    const rows = ledgerRows(dataDir);
    const missing = completed.filter((a) => !rows.has(a.id)).map((a) => a.id);
    expect(missing).toEqual([]);
    for (const a of completed) {
      expect(rows.get(a.id)!.status).toBe('completed');
      expect(rows.get(a.id)!.completionTokens).toBe(a.completionTokens);
    }
    console.log(`kill -9 × 4: ${sent} requests sent, ${completed.length} completed responses, ${n} ledger rows, all completed ones present once`);
  });
});
