#!/usr/bin/env node
// Installs onnxruntime-node's CUDA 12 execution provider (libonnxruntime_providers_cuda.so), which
// `npm ci` skips (see .npmrc): it is downloaded by onnxruntime-node's own install script.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
const result = spawnSync(process.execPath, [path.join(pkg, 'script', 'install.js')], {
  cwd: pkg,
  stdio: 'inherit',
  env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: 'cuda12', npm_config_onnxruntime_node_install: 'cuda12' },
});
if (result.status !== 0) {
  console.error('installing the CUDA execution provider failed: it needs network access to the ONNX Runtime package feed');
  process.exit(result.status ?? 1);
}
