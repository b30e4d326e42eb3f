import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { downloadFile, HubApiError, listFiles, modelInfo, type ListFileEntry } from '@huggingface/hub';

/**
 * Models from the Hugging Face hub (or a mirror: HF_ENDPOINT), kept in the cache layout that Python's
 * huggingface_hub and transformers share (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub):
 *   models--ORG--NAME/blobs/ETAG                   the files' bytes (ETAG: LFS sha256 or git blob id)
 *   models--ORG--NAME/snapshots/COMMIT/FILE        relative symlinks into blobs/
 *   models--ORG--NAME/refs/REVISION                the commit a branch or tag pointed at when pulled
 * A download in progress is blobs/ETAG.incomplete and resumes from its length.
 */

export interface RepoSpec {
  repo: string;
  revision: string;
}

const REPO = /^([\w.-]+\/[\w.-]+)(?:@([\w./-]+))?$/;

/** ORG/NAME[@REVISION], or undefined when spec is not one. */
export function parseRepoSpec(spec: string): RepoSpec | undefined {
  const m = REPO.exec(spec);
  if (!m || m[1].includes('..')) return undefined;
  return { repo: m[1], revision: m[2] ?? 'main' };
}

export function hubEndpoint(): string {
  return (process.env.HF_ENDPOINT || 'https://huggingface.co').replace(/\/+$/, '');
}

export function hubCacheDir(): string {
  if (process.env.HF_HUB_CACHE) return process.env.HF_HUB_CACHE;
  if (process.env.HUGGINGFACE_HUB_CACHE) return process.env.HUGGINGFACE_HUB_CACHE;
  const home = process.env.HF_HOME ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'huggingface');
  return path.join(home, 'hub');
}

function repoFolder(cacheDir: string, repo: string): string {
  return path.join(cacheDir, `models--${repo.split('/').join('--')}`);
}

const CONFIG_FILES = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja'];
const SAFETENSORS = /^model(-\d+-of-\d+)?\.safetensors$/;
/** GGUF types Tally reads, in the order it picks them when a repository holds several files. */
const GGUF_PREFERENCE = ['Q8_0', 'F16', 'BF16', 'F32'];

/**
 * The files Tally needs from a repository's top level: the config and tokenizer files and either its
 * safetensors weights (model.safetensors or the index and its shards) or one GGUF file (`file`, else the first
 * of Q8_0, F16, BF16, F32 by name). Nothing else: other formats a repository holds are not downloaded.
 */
export function selectFiles(entries: { path: string }[], where: string, file?: string): string[] {
  const names = entries.map((e) => e.path);
  if (file) {
    if (!names.includes(file)) throw new Error(`${where} has no file ${file} (files: ${names.join(', ')})`);
    return /\.gguf$/i.test(file) ? [file] : [...new Set([...CONFIG_FILES.filter((f) => names.includes(f)), file])];
  }
  const top = names.filter((n) => !n.includes('/'));
  const weights = top.filter((n) => SAFETENSORS.test(n));
  if (weights.length > 0) {
    return [...CONFIG_FILES, 'model.safetensors.index.json'].filter((f) => top.includes(f)).concat(weights);
  }
  const ggufs = names.filter((n) => /\.gguf$/i.test(n));
  for (const type of GGUF_PREFERENCE) {
    const pick = ggufs.find((n) => new RegExp(`[-_.]${type}[-_.]`, 'i').test(n));
    if (pick) return [pick];
  }
  if (ggufs.length > 0) throw new Error(`${where} has GGUF files but none Tally reads by name (${GGUF_PREFERENCE.join(', ')}): ${ggufs.join(', ')}; pass --file NAME to pick one`);
  throw new Error(`${where} has neither safetensors weights (model.safetensors or model-*-of-*.safetensors) nor a GGUF file (files: ${names.slice(0, 20).join(', ')}${names.length > 20 ? ', …' : ''})`);
}

function isComplete(snapshot: string): boolean {
  if (!fs.existsSync(snapshot)) return false;
  const files = fs.readdirSync(snapshot);
  if (files.some((f) => /\.gguf$/i.test(f))) return true;
  if (!files.includes('config.json') || !files.includes('tokenizer.json')) return false;
  const index = path.join(snapshot, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    const map = (JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map ?? {};
    return Object.values(map).every((f) => fs.existsSync(path.join(snapshot, f)));
  }
  return files.includes('model.safetensors');
}

/** A snapshot already pulled (by Tally or by Python tools) that has what Tally needs, without the network. */
export function cachedSnapshot(spec: RepoSpec, cacheDir = hubCacheDir()): { dir: string; commit: string } | undefined {
  const folder = repoFolder(cacheDir, spec.repo);
  const ref = path.join(folder, 'refs', spec.revision);
  const commit = /^[0-9a-f]{40}$/.test(spec.revision) ? spec.revision : fs.existsSync(ref) ? fs.readFileSync(ref, 'utf8').trim() : undefined;
  if (!commit) return undefined;
  const dir = path.join(folder, 'snapshots', commit);
  return isComplete(dir) ? { dir, commit } : undefined;
}

export interface PullOptions {
  /** A file to take instead of the default choice (a GGUF among several, say). */
  file?: string;
  endpoint?: string;
  token?: string;
  cacheDir?: string;
  /** Where progress goes: a TTY gets a live line per file, anything else one line per finished file. */
  progress?: NodeJS.WriteStream | false;
}

export interface Pulled {
  dir: string;
  repo: string;
  revision: string;
  commit: string;
  files: string[];
}

/** Turns the hub's answers (and the lack of one) into messages that say what to do. */
function explain(err: unknown, spec: RepoSpec, endpoint: string, code: () => string | null, file?: string): Error {
  const tokenSet = Boolean(process.env.HF_TOKEN || process.env.HUGGING_FACE_HUB_TOKEN);
  const what = `${spec.repo}${spec.revision === 'main' ? '' : `@${spec.revision}`}`;
  if (err instanceof HubApiError) {
    const errorCode = code();
    if (errorCode === 'RevisionNotFound') return new Error(`${spec.repo} has no revision "${spec.revision}" on ${endpoint}`);
    if (errorCode === 'EntryNotFound' || (err.statusCode === 404 && file)) return new Error(`${what} has no file ${file} on ${endpoint}`);
    if (errorCode === 'GatedRepo') {
      return new Error(`${spec.repo} is gated: accept its terms at ${endpoint}/${spec.repo} and ${tokenSet ? 'make sure HF_TOKEN belongs to that account' : 'set HF_TOKEN to a token of that account'}`);
    }
    if (err.statusCode === 401 || err.statusCode === 403) {
      return new Error(
        tokenSet
          ? `${endpoint} refused ${what} (${err.statusCode}): the token in HF_TOKEN cannot read it (a private or gated repository, or a misspelt name)`
          : `${endpoint} refused ${what} (${err.statusCode}): it is private or gated, or does not exist; set HF_TOKEN to a token that can read it`,
      );
    }
    if (err.statusCode === 404 || errorCode === 'RepoNotFound') return new Error(`no model ${spec.repo} on ${endpoint}${tokenSet ? '' : ' (a private one needs HF_TOKEN)'}`);
    return new Error(`${endpoint} answered ${err.statusCode} for ${what}: ${err.message}`);
  }
  const e = err as Error & { cause?: { code?: string; message?: string } };
  if (e instanceof TypeError && /fetch failed/.test(e.message)) {
    return new Error(`cannot reach ${endpoint} (${e.cause?.code ?? e.cause?.message ?? 'network error'}): check the network or set HF_ENDPOINT to a mirror; models pulled before are served from ${hubCacheDir()} without it`);
  }
  return e;
}

/**
 * Pulls ORG/NAME[@REVISION]'s files that Tally needs into the hub cache and returns the snapshot folder.
 * Files already there are not downloaded again; a download cut short resumes where it stopped.
 */
export async function pullModel(specText: string, options: PullOptions = {}): Promise<Pulled> {
  const spec = parseRepoSpec(specText);
  if (!spec) throw new Error(`"${specText}" is not a hub model id (ORG/NAME or ORG/NAME@REVISION)`);
  const endpoint = (options.endpoint ?? hubEndpoint()).replace(/\/+$/, '');
  const accessToken = options.token ?? (process.env.HF_TOKEN || process.env.HUGGING_FACE_HUB_TOKEN || undefined);
  const cacheDir = options.cacheDir ?? hubCacheDir();
  let lastErrorCode: string | null = null;
  const fetchTracked: typeof fetch = async (input, init) => {
    const res = await fetch(input, init);
    lastErrorCode = res.headers.get('x-error-code');
    return res;
  };
  const common = { repo: { type: 'model' as const, name: spec.repo }, hubUrl: endpoint, accessToken, fetch: fetchTracked };
  const fail = (err: unknown, file?: string) => explain(err, spec, endpoint, () => lastErrorCode, file);

  let commit: string;
  let entries: ListFileEntry[] = [];
  try {
    const info = await modelInfo({ ...common, name: spec.repo, revision: spec.revision, additionalFields: ['sha'] });
    commit = (info as { sha?: string }).sha ?? '';
    if (!/^[0-9a-f]{40}$/.test(commit)) throw new Error(`${endpoint} gave no commit for ${spec.repo}@${spec.revision}`);
    for await (const entry of listFiles({ ...common, revision: commit, recursive: true })) if (entry.type === 'file') entries.push(entry);
  } catch (err) {
    throw fail(err);
  }
  const selected = selectFiles(entries, `${spec.repo}@${commit.slice(0, 12)}`, options.file);
  entries = selected.map((f) => entries.find((e) => e.path === f)!);

  const folder = repoFolder(cacheDir, spec.repo);
  const snapshot = path.join(folder, 'snapshots', commit);
  const progress = options.progress === undefined ? process.stderr : options.progress;
  for (const entry of entries) {
    const etag = entry.lfs?.oid ?? entry.xetHash ?? entry.oid;
    if (!etag) throw new Error(`${endpoint} listed ${entry.path} without an id`);
    const pointer = path.join(snapshot, entry.path);
    if (fs.existsSync(pointer)) continue;
    const blob = path.join(folder, 'blobs', etag);
    fs.mkdirSync(path.dirname(blob), { recursive: true });
    if (!fs.existsSync(blob)) await downloadBlob(entry, blob, progress, async () => {
      try {
        const remote = await downloadFile({ ...common, path: entry.path, revision: commit });
        if (!remote) throw new Error(`${spec.repo}@${commit.slice(0, 12)} has no file ${entry.path}`);
        return remote;
      } catch (err) {
        throw fail(err, entry.path);
      }
    });
    fs.mkdirSync(path.dirname(pointer), { recursive: true });
    fs.rmSync(pointer, { force: true });
    fs.symlinkSync(path.relative(path.dirname(pointer), blob), pointer);
  }
  if (spec.revision !== commit) {
    fs.mkdirSync(path.dirname(path.join(folder, 'refs', spec.revision)), { recursive: true });
    fs.writeFileSync(path.join(folder, 'refs', spec.revision), commit);
  }
  return { dir: snapshot, repo: spec.repo, revision: spec.revision, commit, files: selected };
}

function formatBytes(n: number): string {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`;
}

/** How many times a download cut short is resumed at once before giving up (a later run resumes it again). */
const RETRIES = 4;

/** Downloads into BLOB.incomplete from its current length, checks size (and sha256 for LFS files), renames. */
async function downloadBlob(entry: ListFileEntry, blob: string, progress: NodeJS.WriteStream | false, open: () => Promise<Blob>): Promise<void> {
  const incomplete = `${blob}.incomplete`;
  if (!fs.existsSync(incomplete)) fs.writeFileSync(incomplete, '');
  const have = fs.statSync(incomplete).size;
  const size = entry.lfs?.size ?? entry.size;
  let done = have;
  const started = Date.now();
  let shown = 0;
  const tty = progress && progress.isTTY;
  const show = (final = false) => {
    if (!tty || (!final && Date.now() - shown < 200)) return;
    shown = Date.now();
    const rate = (done - have) / Math.max(1e-3, (Date.now() - started) / 1000);
    progress.write(`\r${entry.path}  ${size ? ((100 * done) / size).toFixed(0) : 100}%  ${formatBytes(done)} / ${formatBytes(size)}  ${formatBytes(rate)}/s${have ? `  (resumed at ${formatBytes(have)})` : ''}\x1b[K${final ? '\n' : ''}`);
  };
  for (let attempt = 0; done < size; attempt++) {
    const remote = await open();
    const out = fs.createWriteStream(incomplete, { flags: 'a' });
    try {
      for await (const chunk of Readable.fromWeb(remote.slice(done).stream() as import('node:stream/web').ReadableStream<Uint8Array>)) {
        if (!out.write(chunk)) await new Promise<void>((resolve) => out.once('drain', () => resolve()));
        done += (chunk as Uint8Array).length;
        show();
      }
      if (done < size) throw new Error('the connection ended early');
    } catch (err) {
      if (attempt >= RETRIES) {
        throw new Error(`download of ${entry.path} stopped at ${formatBytes(done)} of ${formatBytes(size)} (${(err as Error).message}); run the same command again to resume`);
      }
      await new Promise((resolve) => setTimeout(resolve, 200 * (attempt + 1)));
    } finally {
      await new Promise<void>((resolve) => out.end(resolve));
    }
  }
  const got = fs.statSync(incomplete).size;
  if (got !== size) {
    fs.rmSync(incomplete, { force: true });
    throw new Error(`download of ${entry.path} has ${got} bytes where the hub listed ${size}; the partial file was removed, run the command again`);
  }
  if (entry.lfs?.oid && /^[0-9a-f]{64}$/.test(entry.lfs.oid)) {
    const hash = createHash('sha256');
    for await (const chunk of fs.createReadStream(incomplete, { highWaterMark: 1 << 22 })) hash.update(chunk as Buffer);
    if (hash.digest('hex') !== entry.lfs.oid) {
      fs.rmSync(incomplete, { force: true });
      throw new Error(`download of ${entry.path} does not match its sha256 ${entry.lfs.oid}; the file was removed, run the command again`);
    }
  }
  fs.renameSync(incomplete, blob);
  if (tty) show(true);
  else if (progress) progress.write(`pulled ${entry.path} (${formatBytes(size)})\n`);
}
