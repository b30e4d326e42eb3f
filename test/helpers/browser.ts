/**
 * Headless Chromium for browser tests, from npm alone: @sparticuz/chromium's build (unpacked under
 * /tmp on first use) driven by playwright-core, or the browser at $CHROMIUM_PATH when set.
 */
import sparticuz from '@sparticuz/chromium';
import { type Browser, chromium, type LaunchOptions } from 'playwright-core';

const PLAIN_ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/** A headless Chromium; `options.args` are added to the defaults. The caller closes it. */
export async function launchBrowser(options: LaunchOptions = {}): Promise<Browser> {
  const own = process.env.CHROMIUM_PATH;
  const executablePath = own ?? (await sparticuz.executablePath());
  // Playwright sets the headless mode itself; single-process mode is for AWS Lambda and breaks a second page.
  const base = own ? PLAIN_ARGS : sparticuz.args.filter((a) => !a.startsWith('--headless') && a !== '--single-process' && a !== '--no-zygote');
  return chromium.launch({ ...options, executablePath, headless: true, args: [...base, ...(options.args ?? [])] });
}
