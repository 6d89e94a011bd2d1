import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: [
      'common/**/*.test.ts',
      'coordinator/**/*.test.ts',
      'agent/**/*.test.ts',
      'cli/**/*.test.ts',
      'test/**/*.test.ts',
      'bench/**/*.test.ts',
    ],
    // Integration tests start real Nix builds, gRPC servers and child processes; a generous
    // per-test budget only guards against a hang, it is not a performance assertion.
    testTimeout: 180_000,
    hookTimeout: 60_000,
    pool: 'forks',
    reporters: ['default', './test/support/summary-reporter.ts'],
  },
});
