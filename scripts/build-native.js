#!/usr/bin/env node
// Builds Tally's NVML addon (native/nvml) with node-gyp when a C toolchain is present. It never fails:
// without the addon, GPU telemetry falls back to nvidia-smi, so a missing compiler is only a note.
//   node scripts/build-native.js
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const addonDir = path.join(root, 'native', 'nvml');
const note = (msg) => {
  console.error(`tally: NVML addon not built (${msg}); GPU telemetry will use nvidia-smi instead`);
  process.exit(0);
};

const onPath = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
if (process.platform !== 'linux') note(`NVML is read on Linux only, this is ${process.platform}`);
const cc = process.env.CC ?? ['cc', 'gcc', 'clang'].find(onPath);
if (!cc) note('no C compiler (cc, gcc or clang) on PATH');
for (const tool of ['make', 'python3']) if (!onPath(tool)) note(`${tool} is not on PATH`);

// node-gyp ships with npm: npm hands its path to install scripts; otherwise find it beside npm-cli.js.
function nodeGyp() {
  const candidates = [process.env.npm_config_node_gyp, path.join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')];
  for (const npmCli of [process.env.npm_execpath, resolveNpm()]) {
    if (npmCli) candidates.push(path.join(path.dirname(npmCli), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  }
  return candidates.find((p) => p && fs.existsSync(p));
}
function resolveNpm() {
  const r = spawnSync('sh', ['-c', 'command -v npm'], { encoding: 'utf8' });
  const bin = r.status === 0 ? r.stdout.trim() : '';
  return bin ? fs.realpathSync(bin) : undefined;
}
const gyp = nodeGyp();
if (!gyp) note('node-gyp not found (it ships with npm)');

// Build against the running Node's own headers when they are installed beside it (no download).
const args = [gyp, 'rebuild'];
const prefix = path.resolve(path.dirname(process.execPath), '..');
if (!process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'common.gypi'))) args.push(`--nodedir=${prefix}`);

const result = spawnSync(process.execPath, args, { cwd: addonDir, encoding: 'utf8', env: { ...process.env, CC: cc } });
const built = path.join(addonDir, 'build', 'Release', 'nvml.node');
if (result.status !== 0 || !fs.existsSync(built)) {
  const lastError = `${result.stderr ?? ''}${result.stdout ?? ''}`.split('\n').filter((l) => /error/i.test(l)).slice(0, 1)[0] ?? `node-gyp exited with ${result.status}`;
  note(lastError.trim());
}
console.log(`tally: built ${path.relative(root, built)}`);
