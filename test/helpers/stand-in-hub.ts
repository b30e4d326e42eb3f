/**
 * A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, answering as the hub does the requests that
 * @huggingface/hub and Python's huggingface_hub make to pull a model:
 *   GET /api/models/ORG/NAME/revision/REV           model info with the commit `sha`
 *   GET /api/models/ORG/NAME/tree/REV?recursive=…    files: path, size, git blob oid, lfs { oid: sha256, size }
 *   GET|HEAD /ORG/NAME/resolve/REV/FILE             small files directly (ETag: the blob oid); LFS files as a
 *                                                   302 to /cdn/SHA256 with X-Linked-Etag / X-Linked-Size
 *   GET /cdn/SHA256                                 the bytes, with Range (206 + Content-Range)
 * Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and JSON bodies.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface StandInRepo {
  files: Record<string, Buffer>;
  /** Paths stored in LFS (default: *.safetensors and *.gguf). */
  lfs?: (path: string) => boolean;
  private?: boolean;
  gated?: boolean;
  /** Branches and tags other than main. */
  refs?: Record<string, string>;
}

export interface StandInHub {
  url: string;
  /** Every request: method, path and Range header. */
  requests: { method: string; path: string; range?: string }[];
  /** The next `times` bodies of more than `afterBytes` from /cdn/ are cut (socket destroyed) after that many bytes. */
  cutNext(afterBytes: number, times?: number): void;
  commitOf(repo: string): string;
  close(): Promise<void>;
}

const GOOD_TOKEN = 'hf_standin_good_token';
export const STAND_IN_TOKEN = GOOD_TOKEN;

export async function startStandInHub(repos: Record<string, StandInRepo>): Promise<StandInHub> {
  const requests: StandInHub['requests'] = [];
  let cut: number | undefined;
  let cuts = 0;
  const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  const gitOid = (b: Buffer) => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex');
  const commits = new Map(Object.entries(repos).map(([name, r]) => [name, createHash('sha1').update(name).update(Object.keys(r.files).join()).digest('hex')]));
  const blobs = new Map<string, Buffer>();
  for (const r of Object.values(repos)) for (const b of Object.values(r.files)) blobs.set(sha256(b), b);
  const isLfs = (r: StandInRepo, p: string) => (r.lfs ?? ((x: string) => /\.(safetensors|gguf)$/.test(x)))(p);

  const json = (res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) => {
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(JSON.stringify(body));
  };
  const error = (res: http.ServerResponse, status: number, code: string, message: string) => json(res, status, { error: message }, { 'x-error-code': code });

  const sendBytes = (req: http.IncomingMessage, res: http.ServerResponse, data: Buffer, headers: Record<string, string>, cuttable: boolean) => {
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    let start = 0, end = data.length - 1, status = 200;
    if (m) {
      start = Number(m[1]);
      end = m[2] ? Math.min(Number(m[2]), data.length - 1) : data.length - 1;
      if (start >= data.length) {
        res.writeHead(416, { 'content-range': `bytes */${data.length}` });
        return res.end();
      }
      status = 206;
      headers['content-range'] = `bytes ${start}-${end}/${data.length}`;
    }
    const body = data.subarray(start, end + 1);
    res.writeHead(status, { 'content-type': 'application/octet-stream', 'content-length': String(body.length), 'accept-ranges': 'bytes', ...headers });
    if (req.method === 'HEAD') return res.end();
    if (cuttable && cut !== undefined && body.length > cut) {
      const n = cut;
      if (--cuts <= 0) cut = undefined;
      res.write(body.subarray(0, n), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    res.end(body);
  };

  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const p = decodeURIComponent(url.pathname);
    requests.push({ method: req.method ?? 'GET', path: p, range: req.headers.range });
    const auth = req.headers.authorization;
    const token = auth?.startsWith('Bearer ') ? auth.slice(7) : undefined;

    const cdn = /^\/cdn\/([0-9a-f]{64})$/.exec(p);
    if (cdn) {
      const data = blobs.get(cdn[1]);
      if (!data) return error(res, 404, 'EntryNotFound', 'Entry not found');
      return sendBytes(req, res, data, { etag: `"${cdn[1]}"` }, true);
    }
    const api = /^\/api\/models\/([\w.-]+\/[\w.-]+)\/(revision|tree)\/([^/]+)$/.exec(p);
    const resolve = /^\/([\w.-]+\/[\w.-]+)\/resolve\/([^/]+)\/(.+)$/.exec(p);
    const name = api?.[1] ?? resolve?.[1];
    if (!name) return error(res, 404, 'EntryNotFound', 'Not found');
    const repo = repos[name];
    // As the hub: a repository one may not see looks like one that does not exist (401 without a token).
    if (!repo || (repo.private && token !== GOOD_TOKEN)) {
      return error(res, token ? 404 : 401, 'RepoNotFound', 'Repository Not Found for url: ' + p + '. Please make sure you specified the correct `repo_id` and `repo_type`. If you are trying to access a private or gated repo, make sure you are authenticated.');
    }
    const commit = commits.get(name)!;
    const rev = api?.[3] ?? resolve![2];
    const target = rev === 'main' || rev === 'HEAD' || rev === commit ? commit : repo.refs?.[rev];
    if (!target) return error(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`);

    if (api?.[2] === 'revision') {
      return json(res, 200, { _id: name, id: name, sha: commit, private: Boolean(repo.private), gated: repo.gated ? 'manual' : false, lastModified: '2026-01-01T00:00:00.000Z', siblings: Object.keys(repo.files).map((rfilename) => ({ rfilename })) });
    }
    if (api?.[2] === 'tree') {
      return json(res, 200, Object.entries(repo.files).map(([path, b]) => ({
        type: 'file', oid: gitOid(b), size: b.length, path,
        ...(isLfs(repo, path) && { lfs: { oid: sha256(b), size: b.length, pointerSize: 134 } }),
      })));
    }
    const file = resolve![3];
    if (repo.gated && token !== GOOD_TOKEN) {
      return error(res, token ? 403 : 401, 'GatedRepo', `Access to model ${name} is restricted. You must have access to it and be authenticated to access it. Please log in.`);
    }
    const data = repo.files[file];
    if (!data) return error(res, 404, 'EntryNotFound', `Entry not found`);
    if (isLfs(repo, file)) {
      const hash = sha256(data);
      res.writeHead(302, {
        location: `http://127.0.0.1:${(server.address() as AddressInfo).port}/cdn/${hash}`,
        'x-linked-etag': `"${hash}"`, 'x-linked-size': String(data.length), 'x-repo-commit': commit, etag: `"${gitOid(data)}"`,
      });
      return res.end();
    }
    return sendBytes(req, res, data, { etag: `"${gitOid(data)}"`, 'x-repo-commit': commit }, false);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    requests,
    cutNext: (n, times = 1) => {
      cut = n;
      cuts = times;
    },
    commitOf: (repo) => commits.get(repo)!,
    close: () => new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    }),
  };
}
