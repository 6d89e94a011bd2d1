import { Command, CommanderError } from 'commander';
import { EkaciError, UsageError } from '../common/errors.js';
import { createLogger } from '../common/logging.js';
import { Agent } from './agent.js';
import { compileAgentOptions, parseCount, parseList, readTokenFile, type AgentOptions } from './options.js';

// Exit statuses: 2 is the conventional "you called me wrong" (bad flags, unusable token file).
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

interface Flags {
  coordinator: string;
  tokenFile?: string;
  id?: string;
  maxJobs?: number;
  system?: string[];
  features?: string[];
  mandatoryFeatures?: string[];
  spoolDir?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  nixSandbox?: boolean;
  store?: string;
  drainGrace?: number;
  cacheWait?: number;
  checkMemoryMib?: number;
  checkMaxProcesses?: number;
  exitWithParent?: boolean;
}

function parseArgs(argv: string[]): Flags {
  const program = new Command('ekaci-agent')
    .description('eka-ci builder agent: dials the coordinator and builds what it is given with Nix')
    .requiredOption('--coordinator <host:port>', "the coordinator's gRPC endpoint")
    .option('--token-file <file>', 'file holding the agent token (mode 0600); default: $EKACI_AGENT_TOKEN')
    .option('--id <id>', "agent id: must be the token's name, which is the default")
    .option('--max-jobs <n>', "builds at once (default: Nix's max-jobs)", (v) => parseCount('--max-jobs', v))
    .option('--system <system>', 'a system this host builds (repeatable; default: from Nix)', collect)
    .option('--features <list>', 'supported features, comma-separated (default: from Nix)', parseList)
    .option('--mandatory-features <list>', 'features every accepted derivation must require', parseList)
    .option('--spool-dir <dir>', 'where build logs wait until the coordinator has them')
    .option('--tls-ca <file>', 'PEM root certificate: connect with TLS')
    .option('--tls-cert <file>', 'PEM client certificate, for a coordinator that requires mutual TLS')
    .option('--tls-key <file>', 'PEM key of the client certificate')
    .option(
      '--store <auto|daemon|local>',
      "the host's nix-daemon (daemon), a nix-daemon --stdio of the agent's own on a single-user store (local), or whichever answers (auto)",
    )
    .option('--nix-sandbox', "build in Nix's sandbox even where nix.conf says sandbox = false (single-user stores)")
    .option(
      '--drain-grace <seconds>',
      'on SIGTERM, how long running builds may finish and report before they are stopped (default: 100)',
      (v) => parseCount('--drain-grace', v),
    )
    .option(
      '--cache-wait <seconds>',
      "how long an upload waits for the coordinator's cache to answer (a restart) before the build fails (default: 120)",
      (v) => parseCount('--cache-wait', v, true),
    )
    .option('--check-memory-mib <MiB>', "a check's memory, where cgroups allow; 0 for no limit (default: 4096)", (v) =>
      parseCount('--check-memory-mib', v, true),
    )
    .option(
      '--check-max-processes <n>',
      "a check's processes and threads, where cgroups allow; 0 for no limit (default: 1024)",
      (v) => parseCount('--check-max-processes', v, true),
    )
    .option('--exit-with-parent', 'stop at once when the process that started this agent exits (embedded agents)')
    .exitOverride()
    .configureOutput({ writeErr: () => {} });
  try {
    program.parse(argv);
  } catch (err) {
    if (err instanceof CommanderError && err.exitCode === 0) process.exit(0); // --help, --version
    if (err instanceof EkaciError) throw err;
    throw new UsageError(err instanceof CommanderError ? err.message.replace(/^error: /, '') : String(err));
  }
  return program.opts<Flags>();
}

function parseStore(value: string | undefined): 'auto' | 'daemon' | 'local' | undefined {
  if (value === undefined || value === 'auto' || value === 'daemon' || value === 'local') return value;
  throw new UsageError(`--store takes auto, daemon or local, not '${value}'`);
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

function compile(flags: Flags): AgentOptions {
  const envToken = process.env.EKACI_AGENT_TOKEN;
  let token: string;
  if (flags.tokenFile !== undefined) token = readTokenFile(flags.tokenFile);
  else if (envToken !== undefined && envToken.trim() !== '') token = envToken.trim();
  else throw new UsageError('no agent token: pass --token-file FILE or set EKACI_AGENT_TOKEN');
  return compileAgentOptions({
    coordinator: flags.coordinator,
    token,
    agentId: flags.id,
    maxJobs: flags.maxJobs,
    systems: flags.system,
    features: flags.features,
    mandatoryFeatures: flags.mandatoryFeatures,
    spoolDir: flags.spoolDir,
    tlsCaPath: flags.tlsCa,
    tlsCertPath: flags.tlsCert,
    tlsKeyPath: flags.tlsKey,
    nixSandbox: flags.nixSandbox,
    store: parseStore(flags.store),
    drainGraceMs: flags.drainGrace === undefined ? undefined : flags.drainGrace * 1000,
    cacheWaitMs: flags.cacheWait === undefined ? undefined : flags.cacheWait * 1000,
    checkMemoryMib: flags.checkMemoryMib,
    checkMaxProcesses: flags.checkMaxProcesses,
    logger: createLogger('ekaci-agent'),
  });
}

async function main(): Promise<number> {
  let options: AgentOptions;
  let flags: Flags;
  try {
    flags = parseArgs(process.argv);
    options = compile(flags);
  } catch (err) {
    if (!(err instanceof EkaciError)) throw err;
    process.stderr.write(`ekaci-agent: ${err.message} (${err.code})\n`);
    return EXIT_USAGE;
  }
  const agent = new Agent(options);
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals++;
    options.logger.info({ signal }, signals === 1 ? 'draining; send it again to stop now' : 'stopping now');
    void (signals === 1 ? agent.stopGracefully() : agent.stopNow());
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  if (flags.exitWithParent) watchParent(() => void agent.stopNow());
  try {
    await agent.start();
    await agent.whenStopped();
    return 0;
  } catch (err) {
    const message = err instanceof EkaciError ? `${err.message} (${err.code})` : String(err);
    process.stderr.write(`ekaci-agent: ${message}\n`);
    return err instanceof EkaciError && err.code === 'EKACI_ERR_AGENT_STOPPED' ? 0 : EXIT_FAILED;
  }
}

// Once the agent has stopped, the process ends by itself when nothing is left open; if something still is (a leaked
// handle), it ends anyway this much later: a stopped agent that keeps running only confuses its supervisor.
const EXIT_AFTER_STOP_MS = 2_000;

// How often an embedded agent checks that its parent lives: an orphaned agent would otherwise redial a
// coordinator that is gone, forever.
const PARENT_CHECK_INTERVAL_MS = 1_000;

function watchParent(onGone: () => void): void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(timer);
    onGone();
  }, PARENT_CHECK_INTERVAL_MS);
  timer.unref();
}

process.exitCode = await main();
const lingering = setTimeout(() => {
  process.stderr.write(
    `ekaci-agent: stopped, but still open: ${process.getActiveResourcesInfo().join(', ')}; exiting anyway\n`,
  );
  process.exit();
}, EXIT_AFTER_STOP_MS);
lingering.unref();
