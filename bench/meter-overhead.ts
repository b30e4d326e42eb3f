/**
 * The cost meter's overhead (issue #5): the same streaming load against `tally serve` with the meter and
 * ledger on and with --no-meter, alternating, in one run; prints the throughput ratio.
 *   node --import tsx bench/meter-overhead.ts [--model NAME] [--concurrency 32] [--rounds 3]
 */
import { parseArgs } from 'node:util';
import { streamLoad } from './http-load.ts';
import { startServerProcess } from './server-process.ts';
import { resolveModel } from '../src/model/resolve.ts';

const { values } = parseArgs({ options: { model: { type: 'string' }, concurrency: { type: 'string' }, rounds: { type: 'string' }, tokens: { type: 'string' } } });
const { dir } = resolveModel(values.model ?? 'stories260K');
const concurrency = Number(values.concurrency ?? 32);
const rounds = Number(values.rounds ?? 3);
const maxTokens = Number(values.tokens ?? 256);
const body = (i: number) => ({ model: 'm', prompt: [1, ...Array.from({ length: 15 }, (_, j) => 3 + ((i * 31 + j * 17) % 500))], max_tokens: maxTokens, ignore_eos: true, temperature: 0 });

const on = await startServerProcess(dir, ['--served-model-name', 'm']);
const off = await startServerProcess(dir, ['--served-model-name', 'm', '--no-meter']);
const rates = { on: [] as number[], off: [] as number[] };
await streamLoad(on.url, body, concurrency, concurrency);
await streamLoad(off.url, body, concurrency, concurrency);
for (let r = 0; r < rounds; r++) {
  const order: ['on' | 'off', typeof on][] = r % 2 ? [['off', off], ['on', on]] : [['on', on], ['off', off]];
  for (const [name, server] of order) {
    const res = await streamLoad(server.url, body, concurrency, concurrency * 2);
    if (res.errors) throw new Error(`${res.errors} errors`);
    rates[name].push(res.tokensPerSecond);
  }
}
await on.stop();
await off.stop();
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`concurrency ${concurrency}, ${maxTokens} tokens per request, ${rounds} alternating rounds`);
console.log(`meter + ledger on:  ${rates.on.map((x) => x.toFixed(0)).join(', ')} tok/s (median ${median(rates.on).toFixed(0)})`);
console.log(`meter off:          ${rates.off.map((x) => x.toFixed(0)).join(', ')} tok/s (median ${median(rates.off).toFixed(0)})`);
console.log(`on / off = ${(median(rates.on) / median(rates.off)).toFixed(3)} (bar ≥ 0.98)`);
