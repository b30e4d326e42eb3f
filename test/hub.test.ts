/**
 * `tally pull` and `tally serve --model ORG/NAME` against a stand-in hub that the test starts on 127.0.0.1
 * (serving checkpoints Tally itself wrote): the cache layout Python tools share, the allow-list of files,
 * resuming a cut download, HF_ENDPOINT / HF_HOME / HF_TOKEN, and the errors a user can meet.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadModelFolder } from '../src/model/folder.ts';
import { pullModel } from '../src/model/hub.ts';
import { modelsDir, resolveModelOrPull } from '../src/model/resolve.ts';
import { randomWeights } from '../src/model/random.ts';
import type { LlamaConfig } from '../src/model/types.ts';
import { writeHfCheckpoint, writeLlamaGguf } from './helpers/hf-checkpoint.ts';
import { SHARED_MODELS } from './helpers/models.ts';
import { STAND_IN_TOKEN, startStandInHub, type StandInHub } from './helpers/stand-in-hub.ts';
import { startServerWith } from './helpers/server.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-hub-'));
const ORG = `tally-test-${process.pid}`;
const ENV = ['HF_ENDPOINT', 'HF_HOME', 'HF_TOKEN', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HUGGING_FACE_HUB_TOKEN'] as const;
const savedEnv = Object.fromEntries(ENV.map((k) => [k, process.env[k]]));
let hub: StandInHub;

function filesOf(dir: string): Record<string, Buffer> {
  return Object.fromEntries(fs.readdirSync(dir).map((f) => [f, fs.readFileSync(path.join(dir, f))]));
}

beforeAll(async () => {
  const config: LlamaConfig = { ...JSON.parse(fs.readFileSync(path.join(SHARED_MODELS, 'SmolLM2-135M-Instruct/config.json'), 'utf8')), hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256 };
  writeHfCheckpoint(path.join(tmp, 'smol'), config, randomWeights(config, 5), { dtype: 'BF16', shards: 2 });
  const smol = filesOf(path.join(tmp, 'smol'));
  const tiny: LlamaConfig = { ...config, vocab_size: 96, tie_word_embeddings: false };
  writeLlamaGguf(path.join(tmp, 'tiny-F32.gguf'), tiny, randomWeights(tiny, 2), true);
  const other = { 'pytorch_model.bin': Buffer.alloc(5000, 1), 'onnx/model.onnx': Buffer.alloc(3000, 2), 'original/consolidated.00.pth': Buffer.alloc(4000, 3), 'README.md': Buffer.from('# smol\n') };
  hub = await startStandInHub({
    [`${ORG}/smol`]: { files: { ...smol, ...other }, refs: { v1: 'unused' } },
    [`${ORG}/private`]: { files: smol, private: true },
    [`${ORG}/gated`]: { files: smol, gated: true },
    [`${ORG}/no-weights`]: { files: { 'config.json': smol['config.json'], 'README.md': other['README.md'] } },
    [`${ORG}/tiny-GGUF`]: { files: { 'tiny-Q4_K_M.gguf': Buffer.alloc(2048, 7), 'tiny-F32.gguf': fs.readFileSync(path.join(tmp, 'tiny-F32.gguf')), 'README.md': other['README.md'] } },
  });
});

let home = 0;
/** A fresh HF_HOME for each test, and the stand-in as HF_ENDPOINT. */
function freshEnv(): string {
  const dir = path.join(tmp, `hf-home-${home++}`);
  process.env.HF_HOME = dir;
  process.env.HF_ENDPOINT = hub.url;
  for (const k of ['HF_TOKEN', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HUGGING_FACE_HUB_TOKEN']) delete process.env[k];
  return dir;
}

afterEach(() => {
  for (const k of ENV) if (savedEnv[k] === undefined) delete process.env[k];
  else process.env[k] = savedEnv[k];
});

afterAll(async () => {
  await hub?.close();
  fs.rmSync(tmp, { recursive: true, force: true });
  const cache = path.join(modelsDir(), '.cache');
  if (fs.existsSync(cache)) for (const f of fs.readdirSync(cache)) if (f.startsWith(ORG)) fs.rmSync(path.join(cache, f), { recursive: true, force: true });
});

/** `tally pull` in a child process (asynchronously: the stand-in hub runs in this one). */
function tallyPull(...args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['bin/tally.js', 'pull', ...args], { env: process.env });
    let stdout = '', stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

const sha256 = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

describe('tally pull', () => {
  it('puts the checkpoint in HF_HOME/hub as Python tools lay it out, and only the files Tally needs', async () => {
    const hfHome = freshEnv();
    const r = await tallyPull(`${ORG}/smol`);
    expect(r.status, r.stderr).toBe(0);
    const commit = hub.commitOf(`${ORG}/smol`);
    const repoDir = path.join(hfHome, 'hub', `models--${ORG}--smol`);
    const snapshot = path.join(repoDir, 'snapshots', commit);
    expect(r.stdout.trim()).toBe(snapshot);
    expect(r.stderr).toMatch(/pulled model-00001-of-00002\.safetensors/);
    expect(fs.readFileSync(path.join(repoDir, 'refs', 'main'), 'utf8')).toBe(commit);
    expect(fs.readdirSync(snapshot).sort()).toEqual(['config.json', 'generation_config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json', 'tokenizer.json', 'tokenizer_config.json']);
    for (const f of fs.readdirSync(snapshot)) {
      const link = fs.readlinkSync(path.join(snapshot, f));
      expect(link).toMatch(/^\.\.\/\.\.\/blobs\/[0-9a-f]{40,64}$/);
      expect(sha256(path.join(snapshot, f)), f).toBe(sha256(path.join(tmp, 'smol', f)));
    }
    // LFS files' blobs are named by their sha256, as the hub's X-Linked-Etag says; others by the git blob id.
    const shard = path.join(snapshot, 'model-00001-of-00002.safetensors');
    expect(path.basename(fs.readlinkSync(shard))).toBe(sha256(shard));
    expect(path.basename(fs.readlinkSync(path.join(snapshot, 'config.json')))).toHaveLength(40);
    const fetched = hub.requests.filter((q) => q.path.includes('/resolve/')).map((q) => q.path);
    for (const f of ['pytorch_model.bin', 'onnx/model.onnx', 'original/consolidated.00.pth', 'README.md']) expect(fetched.some((p) => p.endsWith(`/${f}`))).toBe(false);
    // Pulling again downloads nothing.
    const before = hub.requests.length;
    expect((await tallyPull(`${ORG}/smol`)).status).toBe(0);
    expect(hub.requests.slice(before).filter((q) => q.path.includes('/resolve/') || q.path.startsWith('/cdn/'))).toEqual([]);
  });

  it('resumes a download cut once at once, from where it stopped', async () => {
    freshEnv();
    hub.cutNext(40_000);
    const before = hub.requests.length;
    const pulled = await pullModel(`${ORG}/smol`, { progress: false });
    const cdn = hub.requests.slice(before).filter((q) => q.path.startsWith('/cdn/') && q.range !== 'bytes=0-0');
    const shard = path.join(pulled.dir, 'model-00001-of-00002.safetensors');
    // The shard: whole (cut after 40000 bytes were sent), then from what had arrived to the end.
    const resumed = cdn.map((q) => /^bytes=(\d+)-(\d+)$/.exec(q.range ?? '')).filter((m) => m !== null);
    expect(resumed).toHaveLength(1);
    expect(Number(resumed[0]![1])).toBeGreaterThan(0);
    expect(Number(resumed[0]![1])).toBeLessThanOrEqual(40_000);
    expect(Number(resumed[0]![2])).toBe(fs.statSync(shard).size - 1);
    expect(sha256(shard)).toBe(sha256(path.join(tmp, 'smol', 'model-00001-of-00002.safetensors')));
  });

  it('a download cut more often than it retries stops; the same command resumes it', async () => {
    const hfHome = freshEnv();
    hub.cutNext(40_000, 5);
    await expect(pullModel(`${ORG}/smol`, { progress: false })).rejects.toThrow(/download of model-0000\d-of-00002\.safetensors stopped at .* run the same command again to resume/);
    const blobs = path.join(hfHome, 'hub', `models--${ORG}--smol`, 'blobs');
    const partial = fs.readdirSync(blobs).find((f) => f.endsWith('.incomplete'))!;
    const had = fs.statSync(path.join(blobs, partial)).size;
    expect(had).toBeGreaterThan(0);
    expect(had).toBeLessThanOrEqual(5 * 40_000);
    const before = hub.requests.length;
    const pulled = await pullModel(`${ORG}/smol`, { progress: false });
    const resumed = hub.requests.slice(before).filter((q) => q.path === `/cdn/${partial.replace('.incomplete', '')}` && q.range !== 'bytes=0-0');
    expect(resumed.map((q) => q.range)).toEqual([`bytes=${had}-${fs.statSync(path.join(blobs, partial.replace('.incomplete', ''))).size - 1}`]);
    expect(fs.readdirSync(blobs).filter((f) => f.endsWith('.incomplete'))).toEqual([]);
    for (const f of pulled.files) expect(sha256(path.join(pulled.dir, f)), f).toBe(sha256(path.join(tmp, 'smol', f)));
  });

  it('takes one GGUF from a repository of several: the first Tally reads, or --file', async () => {
    freshEnv();
    const shown: string[] = [];
    const terminal = { isTTY: true, write: (s: string) => shown.push(s) } as unknown as NodeJS.WriteStream;
    const pulled = await pullModel(`${ORG}/tiny-GGUF`, { progress: terminal });
    expect(pulled.files).toEqual(['tiny-F32.gguf']);
    // On a terminal: a line rewritten in place (\r), ending with the whole size.
    expect(shown.at(-1)).toMatch(/^\rtiny-F32\.gguf {2}100% {2}[\d.]+ [kM]B \/ [\d.]+ [kM]B {2}.*\n$/);
    expect(hub.requests.some((q) => q.path.endsWith('/tiny-Q4_K_M.gguf'))).toBe(false);
    expect((await pullModel(`${ORG}/tiny-GGUF`, { progress: false, file: 'tiny-Q4_K_M.gguf' })).files).toEqual(['tiny-Q4_K_M.gguf']);
    // Served, it is converted once into models/.cache as local GGUF files are.
    const model = await resolveModelOrPull(`${ORG}/tiny-GGUF`);
    expect(model.name).toBe(`${ORG}/tiny-GGUF`);
    expect(loadModelFolder(model.dir).config).toMatchObject({ model_type: 'llama', vocab_size: 96, hidden_size: 64 });
  });

  it('says what is wrong: private, gated, no such repository or revision, nothing to serve, no hub at all', async () => {
    freshEnv();
    const pull = (spec: string) => pullModel(spec, { progress: false });
    await expect(pull(`${ORG}/private`)).rejects.toThrow(/refused .*private \(401\): it is private or gated, or does not exist; set HF_TOKEN to a token that can read it/);
    await expect(pull(`${ORG}/gated`)).rejects.toThrow(new RegExp(`${ORG}/gated is gated: accept its terms at ${hub.url}/${ORG}/gated and set HF_TOKEN`));
    await expect(pull(`${ORG}/smol@nope`)).rejects.toThrow(/has no revision "nope"/);
    await expect(pull(`${ORG}/no-weights`)).rejects.toThrow(/has neither safetensors weights .* nor a GGUF file \(files: config\.json, README\.md\)/);
    await expect(pull(`${ORG}/smol`).then(() => pullModel(`${ORG}/smol`, { file: 'nope.gguf', progress: false }))).rejects.toThrow(/has no file nope\.gguf/);
    await expect(pull('a/b/c')).rejects.toThrow(/"a\/b\/c" is not a hub model id \(ORG\/NAME or ORG\/NAME@REVISION\)/);
    process.env.HF_TOKEN = 'hf_someone_elses_token';
    await expect(pull(`${ORG}/gated`)).rejects.toThrow(/is gated: .* make sure HF_TOKEN belongs to that account/);
    await expect(pull(`${ORG}/missing`)).rejects.toThrow(new RegExp(`no model ${ORG}/missing on ${hub.url}`));
    process.env.HF_TOKEN = STAND_IN_TOKEN;
    expect((await pull(`${ORG}/private`)).files).toContain('model-00002-of-00002.safetensors');
    expect((await pull(`${ORG}/gated`)).files).toContain('tokenizer.json');
    process.env.HF_ENDPOINT = 'http://127.0.0.1:1';
    await expect(pull(`${ORG}/smol`)).rejects.toThrow(/cannot reach http:\/\/127\.0\.0\.1:1 \(.+\): check the network or set HF_ENDPOINT/);
    // serve --model: a name that is neither a local path nor reachable says both.
    await expect(resolveModelOrPull('models/no-such-model')).rejects.toThrow(/--model models\/no-such-model is no local path, and from the hub: cannot reach/);
  });
});

describe('tally serve --model ORG/NAME', () => {
  it('pulls when missing, converts once, serves it as ORG/NAME; later starts need no hub', async () => {
    const hfHome = freshEnv();
    const logs: Record<string, unknown>[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
    const dataDir = fs.mkdtempSync(path.join(tmp, 'data-'));
    const s = await startServerWith({ model: `${ORG}/smol`, host: '127.0.0.1', port: 0, device: 'cpu', dataDir, logLevel: 'info', maxNumSeqs: 2, kvCacheGb: 0.05, threads: 1 }, logger);
    try {
      expect(logs.map((l) => l.msg)).toEqual(expect.arrayContaining([`pulling ${ORG}/smol from the hub`, expect.stringMatching(/^converting .*snapshots/)]));
      expect(fs.existsSync(path.join(hfHome, 'hub', `models--${ORG}--smol`, 'snapshots', hub.commitOf(`${ORG}/smol`), 'config.json'))).toBe(true);
      const r = await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: `${ORG}/smol`, prompt: 'Hello', max_tokens: 4, temperature: 0 }) });
      const body = await r.json();
      expect(r.status, JSON.stringify(body)).toBe(200);
      expect(body.model).toBe(`${ORG}/smol`);
      expect(body.usage.completion_tokens).toBe(4);
    } finally {
      await s.shutdown(1);
    }
    process.env.HF_ENDPOINT = 'http://127.0.0.1:1';
    const messages: string[] = [];
    const again = await resolveModelOrPull(`${ORG}/smol`, (m) => messages.push(m));
    expect(messages).toEqual([]);
    expect(loadModelFolder(again.dir).config.hidden_size).toBe(64);
  });
});
