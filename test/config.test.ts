import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ConfigError, engineOptionsOf, resolveServeConfig, SERVE_OPTIONS, serveHelp } from '../src/config/serve-config.ts';
import { ENGINE_DEFAULTS } from '../src/engine/protocol.ts';

describe('tally serve configuration', () => {
  it('takes flags over environment variables over defaults, and validates each once', () => {
    const byDefault = resolveServeConfig();
    expect(byDefault).toMatchObject({ host: '127.0.0.1', port: 8000, device: 'cpu', maxNumSeqs: ENGINE_DEFAULTS.maxNumSeqs, kvCacheGb: 4, idleTimeoutSeconds: 60, dataDir: '.tally', noMeter: false, spinWait: false });
    expect(byDefault.model).toBeUndefined();
    expect(resolveServeConfig({}, { PORT: '9100', TALLY_DATA_DIR: '/var/tally' })).toMatchObject({ port: 9100, dataDir: '/var/tally' });
    expect(resolveServeConfig({ port: '9200' }, { PORT: '9100' }).port).toBe(9200);
    expect(resolveServeConfig({ 'kv-cache-dtype': 'fp16', 'api-key': ['a:12345678', 'b:abcdefgh'] })).toMatchObject({ kvCacheDtype: 'float16', apiKeys: ['a:12345678', 'b:abcdefgh'] });
    expect(resolveServeConfig({ 'kv-cache-dtype': 'auto' }).kvCacheDtype).toBeUndefined();
    expect(resolveServeConfig({}, { TALLY_API_KEYS: 'a:12345678, b:abcdefgh' }).apiKeys).toEqual(['a:12345678', 'b:abcdefgh']);
    expect(() => resolveServeConfig({ port: 'eighty' })).toThrow(ConfigError);
    expect(() => resolveServeConfig({ port: 'eighty' })).toThrow(/^--port "eighty": /);
    expect(() => resolveServeConfig({}, { PORT: '-1' })).toThrow(/^PORT "-1": /);
    expect(() => resolveServeConfig({ 'max-num-seqs': '0' })).toThrow(/^--max-num-seqs "0": /);
    expect(() => resolveServeConfig({ 'kv-cache-dtype': 'int8' })).toThrow(/^--kv-cache-dtype "int8": /);
  });

  it('hands the engine its options with the units it uses', () => {
    const config = resolveServeConfig({ 'kv-cache-gb': '0.5', 'max-num-seqs': '8', threads: '2', 'spin-wait': true });
    expect(engineOptionsOf(config, '/m', { kind: 'cpu' })).toEqual({
      modelDir: '/m', device: { kind: 'cpu' }, threads: 2, spinWait: true, attention: undefined, kvCacheDtype: undefined,
      maxNumSeqs: 8, maxNumBatchedTokens: ENGINE_DEFAULTS.maxNumBatchedTokens, maxModelLen: undefined, kvCacheTokens: undefined, kvCacheBytes: 0.5 * 2 ** 30,
      prefixCache: true,
    });
    expect(engineOptionsOf(resolveServeConfig({ 'no-prefix-cache': true }), '/m', { kind: 'cpu' }).prefixCache).toBe(false);
  });

  it('`tally serve --help` is written from the option table: every flag, its default and its variable', () => {
    const run = spawnSync(process.execPath, ['bin/tally.js', 'serve', '--help'], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    expect(run.stdout.trim()).toBe(serveHelp());
    const help = run.stdout.replace(/\s+/g, ' ');
    for (const option of Object.values(SERVE_OPTIONS)) {
      expect(help).toContain(`--${option.flag}`);
      if ('env' in option) expect(help).toContain(`$${option.env}`);
      if ('default' in option && option.default !== false) expect(help).toContain(`(default: ${'defaultText' in option ? option.defaultText : String(option.default)})`);
    }
  });

  it('a bad flag is one line naming it and exit code 2', () => {
    const run = spawnSync(process.execPath, ['bin/tally.js', 'serve', '--max-num-seqs', 'lots'], { encoding: 'utf8' });
    expect(run.status).toBe(2);
    expect(run.stderr).toMatch(/^tally serve: --max-num-seqs "lots": .*\n/);
  });
});
