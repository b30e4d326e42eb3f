import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** `tally serve` in a child process (so the load generator does not share its event loop). */
/** `root`: the checkout whose bin/tally.js runs (default this one). */
export async function startServerProcess(model: string, extra: string[] = [], root = ROOT): Promise<{ url: string; dataDir: string; pid: number; stop: () => Promise<void> }> {
  const port = await freePort();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-'));
  const args = [path.join(root, 'bin/tally.js'), 'serve', '--model', model, '--port', String(port), '--log-level', 'warn', '--data-dir', dataDir, ...extra];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
  const url = `http://127.0.0.1:${port}`;
  const stop = () => new Promise<void>((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
  for (let i = 0; i < 1200; i++) {
    if (child.exitCode !== null) throw new Error(`tally serve exited with code ${child.exitCode}`);
    try {
      if ((await fetch(`${url}/health`)).ok) return { url, dataDir, pid: child.pid!, stop };
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  await stop();
  throw new Error('tally serve did not become healthy');
}
