import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../../test/support/nix-project.js';
import { openDatabase } from '../db/database.js';
import { RunStore } from './run-store.js';

const REPO = 'acme/pkgs';
const sha = (c: string): string => c.repeat(40);

describe('the run store', () => {
  it("lists pull requests with the newest run of each one's current head, in two statements for any number", () => {
    const db = openDatabase(join(tempDir('ekaci-run-store-'), 'db.sqlite'));
    const runs = new RunStore(db);
    runs.upsertRepository({ fullName: REPO, installationId: 1, cloneUrl: 'x', defaultBranch: 'main', private: false });
    const pull = (number: number, head: string, state: 'open' | 'closed' = 'open') =>
      runs.upsertPullRequest({
        repo: REPO,
        number,
        state,
        head_sha: sha(head),
        head_clone_url: 'x',
        base_sha: sha('0'),
        base_ref: 'main',
        author: 'alice',
        author_association: 'MEMBER',
        draft: 0,
        title: `pull ${number}`,
      });
    const run = (number: number, head: string) =>
      runs.createRun({
        repo: REPO,
        installationId: 1,
        kind: 'pull_request',
        prNumber: number,
        baseSha: sha('0'),
        headSha: sha(head),
        baseCloneUrl: 'x',
        headCloneUrl: 'x',
      });
    for (let n = 1; n <= 300; n++) pull(n, 'a');
    pull(2, 'b'); // pushed again: its runs of the old head no longer count
    pull(3, 'c', 'closed');
    const [first, , second] = [run(1, 'a'), run(2, 'a'), run(1, 'a')];
    const ofNewHead = run(2, 'b');
    run(4, 'a'); // another pull request's run of the same commit
    const statements: string[] = [];
    const prepare = db.prepare.bind(db);
    db.prepare = (source: string) => {
      statements.push(source);
      return prepare(source);
    };
    const open = runs.pullRequests(REPO, 'open');
    expect(statements).toHaveLength(2);
    expect(open).toHaveLength(299);
    const byNumber = new Map(open.map((p) => [p.number, p]));
    expect(byNumber.get(1)!.run?.id).toBe(second);
    expect(second).toBeGreaterThan(first);
    expect(byNumber.get(2)!.run?.id).toBe(ofNewHead);
    expect(byNumber.get(4)!.run?.pr_number).toBe(4);
    expect(byNumber.get(5)!.run).toBeUndefined();
    expect(byNumber.get(5)).not.toHaveProperty('latest_run_id');
    expect(runs.pullRequests(REPO, 'closed').map((p) => p.number)).toEqual([3]);
    expect(runs.pullRequests(REPO, 'all')).toHaveLength(300);
    db.close();
  });
});
