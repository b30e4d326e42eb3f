import { parseArgs } from 'node:util';
import { ConfigError, resolveServeConfig, serveArgOptions, serveHelp } from '../config/serve-config.ts';

/** `tally serve`: returns 0 once the server is up (it runs until a signal), else the exit code. */
export async function runServeCommand(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let config;
  try {
    const { values, positionals } = parseArgs({ args: argv, options: { ...serveArgOptions(), help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
    if (values.help) {
      console.log(serveHelp());
      return 0;
    }
    if (positionals.length > 0) throw new ConfigError(`unexpected argument "${positionals[0]}" (the model is given with --model)`);
    config = resolveServeConfig(values, env);
  } catch (err) {
    console.error(`tally serve: ${(err as Error).message}\n\nRun \`tally serve --help\` for the options.`);
    return 2;
  }
  const { runServer } = await import('../server/start.ts');
  await runServer(config);
  return 0;
}
