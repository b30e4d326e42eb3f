/**
 * bench/gpu-check.sh's probe of an ONNX Runtime library through native/ort (the native runner's addon): opens the
 * library, prints its version and providers, and runs a tiny graph (c = a + b) on the CUDA execution provider with
 * its output bound to host memory. Imports nothing that loads onnxruntime-node, so that the library named here is
 * the only ONNX Runtime in the process.
 *   node --import tsx bench/gpu-check-ort.ts LIBRARY [DEVICE_ID]
 * Exit status 0 when the graph ran on CUDA and gave the right sums.
 */
import { createRequire } from 'node:module';
import path from 'node:path';
import { DataType, encodeModel } from '../src/model/onnx-proto.ts';
import type { OrtBinding } from '../src/engine/runners/native-ort.ts';

const [library, deviceId = '0'] = process.argv.slice(2);
if (!library) {
  console.error('usage: gpu-check-ort.ts LIBRARY [DEVICE_ID]');
  process.exit(2);
}
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const addon = createRequire(import.meta.url)(path.join(root, 'native/ort/build/Release/ort.node')) as OrtBinding;
const ort = addon.load(path.resolve(library));
console.log(`ONNX Runtime ${ort.version} (${ort.path}); C API ${ort.apiVersion}; providers: ${ort.providers.join(', ')}`);
const model = encodeModel({
  graphName: 'probe',
  nodes: [{ opType: 'Add', inputs: ['a', 'b'], outputs: ['c'], name: 'add' }],
  inputs: [{ name: 'a', type: DataType.FLOAT, dims: ['n'] }, { name: 'b', type: DataType.FLOAT, dims: ['n'] }],
  outputs: [{ name: 'c', type: DataType.FLOAT, dims: ['n'] }],
  initializers: [],
  opsets: [{ domain: '', version: 17 }],
  metadata: {},
}).model;
const n = 1 << 20;
const a = Float32Array.from({ length: n }, (_, i) => i);
const b = Float32Array.from({ length: n }, (_, i) => 2 * i);
const c = new Float32Array(n);
try {
  const session = addon.createSession(model, { device: 'cuda', deviceId: Number(deviceId), threads: 1 });
  const t0 = performance.now();
  addon.sessionRun(session, [['a', a, [n]], ['b', b, [n]]], [['c', c, [n]]]);
  const ms = performance.now() - t0;
  const wrong = c.findIndex((v, i) => v !== 3 * i);
  addon.release(session);
  if (wrong >= 0) {
    console.log(`CUDA tiny graph: WRONG at ${wrong}: ${c[wrong]}`);
    process.exit(1);
  }
  console.log(`CUDA tiny graph: ${n} sums right, ${ms.toFixed(1)} ms with both copies (first run)`);
} catch (err) {
  console.log(`CUDA tiny graph: failed: ${(err as Error).message.split('\n')[0]}`);
  process.exit(1);
}
