/**
 * Run in a process of its own (the first native runner in a process takes the ONNX Runtime env's thread pool):
 * a native runner on the shared pool and a second one on pools of its own, the threads each added, their logits
 * over the same rows, and the threads a third adds once both are released. Prints one JSON line.
 */
import fs from 'node:fs';
import { loadRunner } from '../../src/engine/runners/load.ts';
import { openOrt } from '../../src/engine/runners/native-ort.ts';
import { loadModelFolder } from '../../src/model/folder.ts';

const threadsNow = () => fs.readdirSync('/proc/self/task').length;
const folder = loadModelFolder(process.argv[2]);
const options = { device: { kind: 'cpu' as const }, threads: 2, maxSlots: 4, maxModelLen: 128, kvCacheBytes: 2 ** 24, runner: 'native' as const };
const before = threadsNow();
const shared = (await loadRunner(folder, options)).runner;
const afterShared = threadsNow();
const own = (await loadRunner(folder, options)).runner;
const afterOwn = threadsNow();
const opened = openOrt();
if ('reason' in opened) throw new Error(opened.reason);

const prompt = Array.from({ length: 40 }, (_, i) => 3 + ((i * 37) % 200));
const steps = [[{ seq: 0, tokens: prompt }, { seq: 1, tokens: prompt.slice(0, 9) }], ...Array.from({ length: 6 }, (_, i) => [{ seq: 0, tokens: [5 + i] }, { seq: 1, tokens: [50 + i] }])];
let diff = 0;
for (const r of [shared, own]) [0, 1].forEach((s) => r.open(s));
for (const rows of steps) {
  const [a, b] = [await shared.forward(rows), await own.forward(rows)];
  a.logits.forEach((row, i) => row.forEach((v, j) => (diff = Math.max(diff, Math.abs(v - b.logits[i][j])))));
}
await shared.release();
await own.release();
const released = threadsNow();
const third = (await loadRunner(folder, options)).runner;
const thirdThreads = threadsNow() - released;
await third.release();
console.log(JSON.stringify({ pool: opened.ort.pool, sharedThreads: afterShared - before, ownThreads: afterOwn - afterShared, thirdThreads, sessions: folder.config.num_hidden_layers + 1, diff }));
