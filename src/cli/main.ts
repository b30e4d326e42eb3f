/** The `tally` command: one subcommand per file here, each returning its exit code. */
const USAGE = `tally — OpenAI-compatible inference on ONNX Runtime, with the cost of every token

Usage:
  tally serve   [--model NAME|DIR|FILE|ORG/NAME] [--port 8000] [--host 127.0.0.1] [--device cpu|cuda[:N]|auto] ...
  tally convert CHECKPOINT OUT_DIR [--tokenizer FILE] [--chat-template FILE] [--format tally|hf] [--dtype fp32|fp16] [--quant int8|int4|none]
  tally convert --random --like DIR OUT_DIR [--seed N] [--set key=value ...] [--chat-template FILE] [--dtype fp32|fp16] [--quant int8|int4]
  tally bench   --url URL --model NAME [--concurrency 1,8,32 | --rate 1,2,4] ...
  tally pull    ORG/NAME[@REVISION] [--file NAME]
  tally keys    add NAME [--rpm N] [--tpm N] [--budget-usd X] | list | revoke NAME  [--file FILE]
  tally cost    [--data-dir DIR] [--by tenant|model|day] [--since 24h|2026-11-01] [--format table|json]

Run \`tally <command> --help\` for a command's options.`;

const COMMANDS: Record<string, () => Promise<(argv: string[]) => Promise<number>>> = {
  serve: async () => (await import('./serve.ts')).runServeCommand,
  convert: async () => (await import('./convert.ts')).runConvertCommand,
  bench: async () => (await import('./bench.ts')).runBenchCommand,
  keys: async () => (await import('./keys.ts')).runKeysCommand,
  pull: async () => (await import('./pull.ts')).runPullCommand,
  cost: async () => (await import('./cost.ts')).runCostCommand,
};

async function main(): Promise<number> {
  const [command, ...rest] = process.argv.slice(2);
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    console.log(USAGE);
    return 0;
  }
  const load = COMMANDS[command];
  if (!load) {
    console.error(`unknown command "${command}"\n\n${USAGE}`);
    return 2;
  }
  return (await load())(rest);
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: Error) => {
    console.error(`tally: ${err.message}`);
    process.exitCode = 1;
  },
);
