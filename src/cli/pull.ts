import { parseArgs } from 'node:util';
import { pullModel } from '../model/hub.ts';

/** `tally pull ORG/NAME[@REVISION] [--file NAME]`: prints the snapshot folder. */
export async function runPullCommand(argv: string[]): Promise<number> {
  const help = `tally pull ORG/NAME[@REVISION] — download a model's safetensors checkpoint (or one GGUF) from the hub

  --file NAME    take this file (e.g. one GGUF among several) instead of the default choice
Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (gated and private models),
HF_HOME / HF_HUB_CACHE (cache, shared with Python tools; default ~/.cache/huggingface/hub).
\`tally serve --model ORG/NAME\` pulls when the model is not in the cache and converts it once.`;
  const { values, positionals } = parseArgs({ args: argv, options: { file: { type: 'string' }, help: { type: 'boolean', short: 'h' } }, allowPositionals: true });
  if (values.help || positionals.length !== 1) {
    (values.help ? console.log : console.error)(help);
    return values.help ? 0 : 2;
  }
  const pulled = await pullModel(positionals[0], { file: values.file });
  console.log(pulled.dir);
  return 0;
}
