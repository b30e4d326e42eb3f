import fs from 'node:fs';
import path from 'node:path';
import { HorizontalPodAutoscaler, type IHorizontalPodAutoscaler } from 'kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler';
import { Deployment, type IDeployment } from 'kubernetes-models/apps/v1/Deployment';
import { ConfigMap, type IConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { PersistentVolumeClaim } from 'kubernetes-models/v1/PersistentVolumeClaim';
import { Service, type IService } from 'kubernetes-models/v1/Service';
import type { IContainer } from 'kubernetes-models/v1/Container';
import type { IProbe } from 'kubernetes-models/v1/Probe';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { parseDevice } from '../src/config/serve-config.ts';
import { resolveDevicePrice } from '../src/meter/prices.ts';
import { Metrics } from '../src/telemetry/metrics.ts';

const DIR = path.resolve('deploy/k8s');

/** The kubernetes-models class (JSON-schema validation) and TypeScript interface of each kind used. */
const KINDS: Record<string, { model: new (data: object) => { validate(): void }; module: string; type: string }> = {
  'v1/ConfigMap': { model: ConfigMap, module: 'kubernetes-models/v1/ConfigMap', type: 'IConfigMap' },
  'v1/Service': { model: Service, module: 'kubernetes-models/v1/Service', type: 'IService' },
  'v1/PersistentVolumeClaim': { model: PersistentVolumeClaim, module: 'kubernetes-models/v1/PersistentVolumeClaim', type: 'IPersistentVolumeClaim' },
  'apps/v1/Deployment': { model: Deployment, module: 'kubernetes-models/apps/v1/Deployment', type: 'IDeployment' },
  'autoscaling/v2/HorizontalPodAutoscaler': { model: HorizontalPodAutoscaler, module: 'kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler', type: 'IHorizontalPodAutoscaler' },
};

type Doc = { file: string; kind: string; apiVersion: string; metadata: { name: string }; [k: string]: unknown };

function load(): Doc[] {
  const docs: Doc[] = [];
  for (const file of fs.readdirSync(DIR).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    for (const doc of parseAllDocuments(fs.readFileSync(path.join(DIR, file), 'utf8'))) {
      expect(doc.errors, `${file}: ${doc.errors.join('; ')}`).toEqual([]);
      const value = doc.toJS() as Doc | null;
      if (value !== null) docs.push({ ...value, file });
    }
  }
  return docs;
}

const key = (d: { apiVersion: string; kind: string }) => `${d.apiVersion}/${d.kind}`;
const strip = ({ file: _file, ...doc }: Doc) => doc;

/**
 * JSON-schema validation does not refuse unknown fields, so each document is also type-checked against
 * kubernetes-models' interfaces as an object literal: a misspelt field anywhere is an excess property.
 */
function unknownFields(docs: Doc[]): string[] {
  const file = path.resolve('test/__k8s_documents__.ts');
  const imports = [...new Set(docs.map((d) => KINDS[key(d)]))].map((k) => `import type { ${k.type} } from '${k.module}';`);
  const decls = docs.map((d, i) => `export const doc${i}: ${KINDS[key(d)].type} = ${JSON.stringify(strip(d), null, 1)};`);
  const source = [...imports, ...decls].join('\n');
  const options: ts.CompilerOptions = { strict: true, noEmit: true, module: ts.ModuleKind.ESNext, moduleResolution: ts.ModuleResolutionKind.Bundler, target: ts.ScriptTarget.ES2022, types: [], skipLibCheck: true };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, lang, ...rest) => (path.resolve(name) === file ? ts.createSourceFile(name, source, lang) : getSourceFile.call(host, name, lang, ...rest));
  host.fileExists = (name) => path.resolve(name) === file || fileExists.call(host, name);
  host.readFile = (name) => (path.resolve(name) === file ? source : readFile.call(host, name));
  const program = ts.createProgram([file], options, host);
  return ts.getPreEmitDiagnostics(program, program.getSourceFile(file)).map((d) => {
    const line = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start).line : -1;
    const at = docs[Number(/export const doc(\d+)/.exec(source.split('\n').slice(0, line + 1).reverse().find((l) => l.startsWith('export const doc')) ?? '')?.[1])];
    return `${at ? `${at.file} ${at.kind} ${at.metadata.name}` : '?'}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
  });
}

const docs = load();
const one = <T>(apiKind: string) => {
  const found = docs.filter((d) => key(d) === apiKind);
  expect(found, apiKind).toHaveLength(1);
  return found[0] as unknown as T & { file: string };
};

describe('deploy/k8s', () => {
  it('every document is a known kind that passes the Kubernetes JSON schemas', () => {
    expect(docs.length).toBeGreaterThanOrEqual(5);
    for (const doc of docs) {
      const kind = KINDS[key(doc)];
      expect(kind, `${doc.file}: ${key(doc)}`).toBeDefined();
      expect(() => new kind.model(strip(doc)).validate(), `${doc.file} ${doc.kind}`).not.toThrow();
    }
  });

  it('has no field the Kubernetes types do not know', () => {
    expect(unknownFields(docs)).toEqual([]);
  }, 60_000);

  it('would catch a misspelt field and a wrongly typed value', () => {
    const deployment = docs.find((d) => d.kind === 'Deployment')!;
    const typo = JSON.parse(JSON.stringify(deployment).replace('"readinessProbe"', '"readinessProb"')) as Doc;
    expect(unknownFields([typo]).join('\n')).toMatch(/'"?readinessProb"?' does not exist in type 'IContainer'/);
    const wrong = { ...strip(deployment), spec: { ...(deployment.spec as object), replicas: 'one' } };
    expect(() => new Deployment(wrong as unknown as IDeployment).validate()).toThrow(/replicas/);
  }, 60_000);

  const deployment = one<IDeployment>('apps/v1/Deployment');
  const pod = deployment.spec!.template.spec!;
  const container = pod.containers.find((c) => c.name === 'tally') as IContainer;
  const httpPort = container.ports!.find((p) => p.name === 'http')!;
  const arg = (flag: string) => container.args!.find((a) => a.startsWith(`${flag}=`))?.slice(flag.length + 1);

  it('runs the Dockerfile.cuda image on one GPU, as its non-root user', () => {
    expect(container.image).toMatch(/\/tally:cuda$/);
    expect(container.resources!.limits!['nvidia.com/gpu']).toBe(1);
    expect(container.command).toEqual(['node', 'bin/tally.js', 'serve']);
    expect(parseDevice(arg('--device')!)).toEqual({ kind: 'cuda', index: 0 });
    expect(resolveDevicePrice(arg('--device-price')).name).toBe(arg('--device-price'));
    expect(Number(arg('--port'))).toBe(httpPort.containerPort);
    expect(arg('--host')).toBe('0.0.0.0');
    const uid = Number(/useradd .*--uid (\d+)/.exec(fs.readFileSync('Dockerfile.cuda', 'utf8'))![1]);
    expect(uid).toBe(10001);
    expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: uid });
    expect(container.securityContext).toMatchObject({ allowPrivilegeEscalation: false });
  });

  it('probes /health on the container port', () => {
    const probes = [container.readinessProbe, container.livenessProbe, container.startupProbe].filter(Boolean) as IProbe[];
    expect(container.readinessProbe).toBeDefined();
    expect(container.livenessProbe).toBeDefined();
    for (const probe of probes) {
      expect(probe.httpGet!.path).toBe('/health');
      expect([httpPort.name, httpPort.containerPort]).toContain(probe.httpGet!.port);
    }
  });

  it('is scraped on its metrics port and mounts its model volume', () => {
    const annotations = deployment.spec!.template.metadata!.annotations!;
    expect(annotations).toMatchObject({ 'prometheus.io/scrape': 'true', 'prometheus.io/path': '/metrics' });
    expect(Number(annotations['prometheus.io/port'])).toBe(httpPort.containerPort);
    const modelMount = container.volumeMounts!.find((m) => arg('--model')!.startsWith(`${m.mountPath}/`))!;
    const volume = pod.volumes!.find((v) => v.name === modelMount.name)!;
    const claim = volume.persistentVolumeClaim?.claimName;
    if (claim) expect(docs.filter((d) => d.kind === 'PersistentVolumeClaim').map((d) => d.metadata.name)).toContain(claim);
    else expect(volume.emptyDir).toBeDefined();
  });

  it('the Service selects the pods and targets the container port', () => {
    const service = one<IService>('v1/Service');
    expect(deployment.spec!.template.metadata!.labels).toMatchObject(service.spec!.selector!);
    expect(deployment.spec!.selector.matchLabels).toMatchObject(service.spec!.selector!);
    for (const port of service.spec!.ports!) expect([httpPort.name, httpPort.containerPort]).toContain(port.targetPort);
  });

  it('the HPA scales the Deployment on metrics the adapter serves from metrics Tally exports', () => {
    const hpa = one<IHorizontalPodAutoscaler>('autoscaling/v2/HorizontalPodAutoscaler');
    expect(hpa.spec!.scaleTargetRef).toMatchObject({ apiVersion: 'apps/v1', kind: 'Deployment', name: deployment.metadata!.name });
    const podMetrics = hpa.spec!.metrics!.filter((m) => m.type === 'Pods').map((m) => m.pods!);
    expect(podMetrics.find((m) => m.metric.name === 'tally_num_requests_waiting')?.target).toMatchObject({ type: 'AverageValue' });

    const adapter = one<IConfigMap>('v1/ConfigMap');
    const config = parseAllDocuments(adapter.data!['config.yaml'])[0].toJS() as {
      rules: { seriesQuery: string; resources: { overrides: Record<string, { resource: string }> }; name: { matches: string; as: string }; metricsQuery: string }[];
    };
    const exported = new Metrics().registry.getMetricsAsArray().map((m) => m.name);
    const served = new Map<string, string>();
    for (const rule of config.rules) {
      const selector = /__name__=~"([^"]+)"/.exec(rule.seriesQuery)?.[1] ?? /^[\w:]+/.exec(rule.seriesQuery)![0];
      expect(rule.seriesQuery).toMatch(/namespace!="",pod!=""/);
      expect(Object.values(rule.resources.overrides).map((o) => o.resource).sort()).toEqual(['namespace', 'pod']);
      expect(rule.metricsQuery).toContain('<<.Series>>{<<.LabelMatchers>>}');
      for (const name of exported) {
        if (!new RegExp(`^(?:${selector})$`).test(name)) continue;
        const m = new RegExp(rule.name.matches).exec(name);
        if (m) served.set(rule.name.as.replace(/\$\{(\d+)\}/g, (_, i: string) => m[Number(i)]), name);
      }
    }
    for (const metric of podMetrics) expect(served.has(metric.metric.name), `${metric.metric.name} is served by the adapter`).toBe(true);
    expect(served.get('tally_num_requests_waiting')).toBe('tally:num_requests_waiting');
  });
});
