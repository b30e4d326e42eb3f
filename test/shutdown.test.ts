/**
 * `tally serve` as a child process: SIGTERM stops admitting, finishes what is in flight (or, past the grace
 * period, cancels it), flushes the ledger and exits 0; a model that fails to load stops start-up with exit 1
 * and a clear message.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { describe, expect, it } from 'vitest';
import { storiesModel } from './helpers/models.ts';

const tmp = (prefix: string) => fs.mkdtempSync(path.join(os.tmpdir(), prefix));

interface Child {
  child: ChildProcess;
  url: string;
  exited: Promise<number | null>;
  output: () => string;
}

function serve(args: string[]): Promise<Child> {
  const child = spawn(process.execPath, ['bin/tally.js', 'serve', '--port', '0', '--max-num-seqs', '8', '--kv-cache-gb', '0.25', '--threads', '1', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return new Promise((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /"url":"(http:[^"]+)".*"msg":"serving"/.exec(out);
      if (m) resolve({ child, url: m[1], exited, output: () => out });
    });
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => reject(Object.assign(new Error(`tally serve exited (${code})`), { code, output: out })));
  });
}

/** A streamed completion: resolves with its events once the stream ends; `started` when the first token came. */
function stream(url: string, body: Record<string, unknown>) {
  let started!: () => void;
  const first = new Promise<void>((r) => (started = r));
  const done = (async () => {
    const r = await fetch(`${url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
    const id = `cmpl-${r.headers.get('x-request-id')}`;
    let text = '';
    const decoder = new TextDecoder();
    for await (const chunk of r.body!) {
      text += decoder.decode(chunk as Uint8Array, { stream: true });
      if (text.includes('"text"')) started();
    }
    started();
    const events = text.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
    return { id, events, text };
  })();
  return { first, done };
}

const ledgerRows = (dataDir: string) => {
  const db = new Database(path.join(dataDir, 'ledger.sqlite'), { readonly: true });
  const rows = db.prepare('SELECT id, status, completion_tokens AS completionTokens FROM requests').all() as { id: string; status: string; completionTokens: number }[];
  expect(db.pragma('integrity_check', { simple: true })).toBe('ok');
  db.close();
  return new Map(rows.map((r) => [r.id, r]));
};

describe('SIGTERM', () => {
  it('stops admitting, finishes the requests in flight, flushes the ledger and exits 0', async () => {
    const dataDir = tmp('tally-term-');
    const s = await serve(['--model', storiesModel(), '--data-dir', dataDir]);
    const body = { prompt: 'Once upon a time', max_tokens: 400, ignore_eos: true };
    const streams = [stream(s.url, body), stream(s.url, body), stream(s.url, { ...body, n: 2 })];
    const whole = fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    await Promise.all(streams.map((x) => x.first));
    s.child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 100));
    // No longer admitting: the listener is closed.
    const refused = await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then((r) => r.status, () => 'refused');
    expect(refused === 'refused' || refused === 503).toBe(true);

    const results = await Promise.all(streams.map((x) => x.done));
    const wholeResponse = await whole;
    const wholeBody = (await wholeResponse.json()) as { id: string; usage: { completion_tokens: number } };
    expect(await s.exited).toBe(0);
    expect(s.output()).toContain('"msg":"stopped"');

    const rows = ledgerRows(dataDir);
    for (const r of results) {
      expect(r.events.at(-1)).toBe('[DONE]');
      const usage = JSON.parse(r.events.at(-2)!).usage;
      expect(rows.get(r.id)).toMatchObject({ status: 'completed', completionTokens: usage.completion_tokens });
    }
    expect(wholeResponse.status).toBe(200);
    expect(rows.get(wholeBody.id)).toMatchObject({ status: 'completed', completionTokens: 400 });
  });

  it('past the grace period cancels what is in flight (503 to the clients, cancelled in the ledger) and exits 0', async () => {
    const dataDir = tmp('tally-term-grace-');
    const s = await serve(['--model', storiesModel(), '--data-dir', dataDir, '--shutdown-grace', '0.3']);
    const body = { prompt: 'Once upon a time', max_tokens: 2000, ignore_eos: true };
    const streams = [stream(s.url, body), stream(s.url, { ...body, n: 2 })];
    const whole = fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    await Promise.all(streams.map((x) => x.first));
    const t0 = Date.now();
    s.child.kill('SIGTERM');
    const results = await Promise.all(streams.map((x) => x.done));
    const wholeResponse = await whole;
    expect(await s.exited).toBe(0);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(s.output()).toContain('grace period over: cancelling requests in flight');

    const rows = ledgerRows(dataDir);
    for (const r of results) {
      const error = r.events.find((e) => e.startsWith('{"error"'));
      expect(error).toContain('shutting down');
      expect(r.events.at(-1)).toBe('[DONE]');
      expect(rows.get(r.id)?.status).toBe('cancelled');
      expect(rows.get(r.id)!.completionTokens).toBeLessThan(2000 * 2);
    }
    expect(wholeResponse.status).toBe(503);
    const wholeError = (await wholeResponse.json()) as { error: { message: string } };
    expect(wholeError.error.message).toContain('shutting down');
    expect(rows.get(`cmpl-${wholeResponse.headers.get('x-request-id')}`)?.status).toBe('cancelled');
  });
});

describe('start-up', () => {
  it('a model that fails to load stops start-up with exit 1 and a clear message', async () => {
    const broken = tmp('tally-broken-model-');
    fs.cpSync(storiesModel(), broken, { recursive: true });
    fs.writeFileSync(path.join(broken, 'onnx', 'model.onnx'), Buffer.from('not an onnx graph'));
    const err = await serve(['--model', broken, '--data-dir', tmp('tally-broken-data-')]).then(
      () => undefined,
      (e: { code: number; output: string }) => e,
    );
    expect(err?.code).toBe(1);
    expect(err?.output).toContain(`tally serve: could not load the model in ${broken}`);
    const missing = await serve(['--model', 'no-such-model', '--data-dir', tmp('tally-broken-data-')]).then(
      () => undefined,
      (e: { code: number; output: string }) => e,
    );
    expect(missing?.code).toBe(1);
    // One readable line on stderr, not a JSON log record.
    expect(missing?.output).toMatch(/^tally serve: model "no-such-model" not found in .*, or pass --model PATH to a folder with config\.json and onnx\/model\.onnx\.$/m);
    expect(missing?.output).not.toMatch(/"level":\s*60/);
  });
});
