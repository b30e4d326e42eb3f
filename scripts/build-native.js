#!/usr/bin/env node
// Builds Tally's native addons with node-gyp when a C toolchain is present. It never fails: without an
// addon Tally falls back (NVML: GPU telemetry through nvidia-smi; attention: attention inside the ONNX
// graph on the CPU; ort: the JavaScript runners), so a missing compiler is only a note.
//   node scripts/build-native.js [nvml|attention|ort ...]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const ADDONS = {
  nvml: { linuxOnly: 'NVML is read on Linux only', fallback: 'GPU telemetry will use nvidia-smi instead' },
  attention: { fallback: 'attention will run inside the ONNX graph on the CPU' },
  ort: { linuxOnly: 'the native runner opens ONNX Runtime with dlopen on Linux only', fallback: 'the JavaScript runners will be used (--runner js)' },
};

const onPath = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;

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

/** Builds one addon; returns why not, or undefined when built. */
function build(name) {
  const addon = ADDONS[name];
  if (addon.linuxOnly && process.platform !== 'linux') return `${addon.linuxOnly}, this is ${process.platform}`;
  const cc = process.env.CC ?? ['cc', 'gcc', 'clang'].find(onPath);
  if (!cc) return 'no C compiler (cc, gcc or clang) on PATH';
  for (const tool of ['make', 'python3']) if (!onPath(tool)) return `${tool} is not on PATH`;
  const gyp = nodeGyp();
  if (!gyp) return 'node-gyp not found (it ships with npm)';
  // Build against the running Node's own headers when they are installed beside it (no download).
  const args = [gyp, 'rebuild'];
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (!process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'common.gypi'))) args.push(`--nodedir=${prefix}`);
  const addonDir = path.join(root, 'native', name);
  const result = spawnSync(process.execPath, args, { cwd: addonDir, encoding: 'utf8', env: { ...process.env, CC: cc } });
  const built = path.join(addonDir, 'build', 'Release', `${name}.node`);
  if (result.status !== 0 || !fs.existsSync(built)) {
    const lastError = `${result.stderr ?? ''}${result.stdout ?? ''}`.split('\n').filter((l) => /error/i.test(l)).slice(0, 1)[0];
    return (lastError ?? `node-gyp exited with ${result.status}`).trim();
  }
  console.log(`tally: built ${path.relative(root, built)}`);
  return undefined;
}

const wanted = process.argv.slice(2);
for (const name of wanted.length > 0 ? wanted : Object.keys(ADDONS)) {
  if (!(name in ADDONS)) {
    console.error(`tally: unknown addon ${name} (${Object.keys(ADDONS).join(', ')})`);
    continue;
  }
  const why = build(name);
  if (why) console.error(`tally: ${name} addon not built (${why}); ${ADDONS[name].fallback}`);
}
