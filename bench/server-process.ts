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

export interface ServerProcessOptions {
  /** The checkout whose bin/tally.js runs (default this one). */
  root?: string;
  /** Node's own flags, before the script (e.g. --trace-gc). */
  nodeArgs?: string[];
  /** Each line the server writes to stdout (else stdout is this process's). */
  onStdoutLine?: (line: string) => void;
}

/** `tally serve` in a child process (so the load generator does not share its event loop). */
export async function startServerProcess(model: string, extra: string[] = [], options: ServerProcessOptions = {}): Promise<{ url: string; dataDir: string; pid: number; stop: () => Promise<void> }> {
  const port = await freePort();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-'));
  const args = [...(options.nodeArgs ?? []), path.join(options.root ?? ROOT, 'bin/tally.js'), 'serve', '--model', model, '--port', String(port), '--log-level', 'warn', '--data-dir', dataDir, ...extra];
  const child = spawn(process.execPath, args, { stdio: ['ignore', options.onStdoutLine ? 'pipe' : 'inherit', 'inherit'] });
  if (options.onStdoutLine) {
    let buffered = '';
    child.stdout!.on('data', (d: Buffer) => {
      buffered += d.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) options.onStdoutLine!(line);
    });
  }
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

/** The peak resident set of a process (VmHWM), in MiB. */
export function peakRssMb(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}
