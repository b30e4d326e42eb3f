import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import './helpers/server.ts'; // lets EngineClient's .ts worker start under vitest on Node 20
import { EngineClient } from '../src/engine/client/engine-client.ts';
import { ENGINE_DEFAULTS } from '../src/engine/protocol.ts';
import { resolveServeConfig } from '../src/config/serve-config.ts';
import { createSession, cudaProviderProblem } from '../src/engine/runners/ort-session.ts';
import { parseDevice } from '../src/config/serve-config.ts';
import { storiesModel } from './helpers/models.ts';

/** onnxruntime-node's CUDA provider is not installed here (npm ci skips it), as on any CPU machine. */
const noProvider = cudaProviderProblem() !== undefined;
const PROVIDER = /libonnxruntime_providers_cuda\.so is missing\); run `npm run install-cuda`.* or use --device cpu/;
const STACK = /\n\s+at /;

describe('parseDevice', () => {
  it.each([
    ['cpu', { kind: 'cpu' }],
    ['auto', { kind: 'auto' }],
    ['cuda', { kind: 'cuda', index: 0 }],
    ['cuda:0', { kind: 'cuda', index: 0 }],
    ['cuda:3', { kind: 'cuda', index: 3 }],
  ])('%s', (value, spec) => {
    expect(parseDevice(value)).toEqual(spec);
  });

  it.each(['', 'gpu', 'CUDA', 'cuda:', 'cuda:-1', 'cuda:1.5', 'cuda:x', 'cpu:0', ' cpu'])('refuses %j', (value) => {
    expect(() => parseDevice(value)).toThrow(`must be cpu, cuda, cuda:N or auto (got "${value}")`);
    expect(() => resolveServeConfig({ device: value })).toThrow(`--device "${value}": must be cpu, cuda, cuda:N or auto (got "${value}")`);
  });
});

describe.skipIf(!noProvider)('device selection without the CUDA provider', () => {
  const onnx = () => path.join(storiesModel(), 'onnx', 'model.onnx');

  it('cudaProviderProblem names the missing provider library and the fix', () => {
    expect(cudaProviderProblem()).toMatch(/^the CUDA execution provider is not installed \(\/.*\/libonnxruntime_providers_cuda\.so is missing\)/);
    expect(cudaProviderProblem()).toMatch(PROVIDER);
  });

  it('--device cuda and cuda:N fail with that message', async () => {
    for (const device of ['cuda', 'cuda:1']) {
      const err = await createSession(onnx(), { device: parseDevice(device) }).catch((e: Error) => e);
      expect(err).toBeInstanceOf(Error);
      expect((err as Error).message).toMatch(PROVIDER);
    }
  });

  it('--device auto falls back to the CPU with a note', async () => {
    const loaded = await createSession(onnx(), { device: parseDevice('auto') });
    try {
      expect(loaded.device).toBe('cpu');
      expect(loaded.note).toMatch(/^--device auto: the CUDA execution provider is not installed .*; using the CPU$/);
      expect(loaded.session.inputNames.length).toBeGreaterThan(0);
    } finally {
      await loaded.session.release();
    }
  });

  it('--device cpu loads with no note', async () => {
    const loaded = await createSession(onnx(), { device: parseDevice('cpu') });
    expect(loaded).toMatchObject({ device: 'cpu', note: undefined });
    await loaded.session.release();
  });

  const engine = (device: string) =>
    EngineClient.start({ modelDir: storiesModel(), device: parseDevice(device), maxNumSeqs: 4, maxNumBatchedTokens: 256, kvCacheBytes: ENGINE_DEFAULTS.kvCacheBytes });

  it('the engine refuses to start on --device cuda with the message alone, no stack trace', async () => {
    const err = (await engine('cuda').then(
      async (e) => {
        await e.close();
        return undefined;
      },
      (e: Error) => e,
    )) as Error | undefined;
    expect(err?.message).toMatch(PROVIDER);
    expect(err?.message).not.toMatch(STACK);
  });

  it('the engine starts on --device auto on the CPU and passes the note on', async () => {
    const e = await engine('auto');
    try {
      expect(e.info.device).toBe('cpu');
      expect(e.info.deviceNote).toMatch(/^--device auto: .*libonnxruntime_providers_cuda\.so is missing.*; using the CPU$/);
    } finally {
      await e.close();
    }
  });

  it('`tally serve --device cuda` exits 1 with one line naming the provider library', () => {
    const r = spawnSync(
      process.execPath,
      ['bin/tally.js', 'serve', '--model', storiesModel(), '--device', 'cuda', '--port', '0', '--data-dir', path.join(os.tmpdir(), `tally-devsel-${process.pid}`)],
      { encoding: 'utf8', timeout: 60_000 },
    );
    const out = `${r.stdout}${r.stderr}`;
    expect(r.status, out).toBe(1);
    expect(out).toMatch(PROVIDER);
    expect(out).not.toMatch(STACK);
  });
});
