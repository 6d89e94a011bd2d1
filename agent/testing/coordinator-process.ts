/**
 * A ScriptedCoordinator in a process of its own, for tests that kill the coordinator (`kill -9`) under a running
 * `ekaci-agent`. Prints `listening HOST:PORT` once it accepts calls, then `event LEASE KIND` for every job event it
 * receives. Flags: `--no-ack` never acknowledges job events, so the agent's results stay pending; `--assign
 * LEASE=DRV` (repeatable) assigns builds at the first Credit; `--welcome-json JSON` sets fields of its Welcome.
 */
import { ScriptedCoordinator } from './scripted-coordinator.js';
import { testAssign } from './assign.js';

const args = process.argv.slice(2);
const value = (flag: string): string | undefined => args[args.indexOf(flag) + 1];
const welcome = args.includes('--welcome-json') ? (JSON.parse(value('--welcome-json') ?? '{}') as object) : {};
const assigns = args.flatMap((a, i) => (args[i - 1] === '--assign' ? [a.split('=')] : []));

const c = await ScriptedCoordinator.start({
  autoAckEvents: !args.includes('--no-ack'),
  welcome,
  onMessage: (m, s) => {
    if (m.msg?.$case === 'jobEvent') process.stdout.write(`event ${m.msg.value.leaseId} ${m.msg.value.event?.$case}\n`);
    if (m.msg?.$case !== 'credit') return;
    for (const [leaseId = '', drvPath = ''] of assigns.splice(0)) {
      s.send({ $case: 'assign', value: testAssign(leaseId, drvPath) });
    }
  },
});
process.stdout.write(`listening ${c.address}\n`);
