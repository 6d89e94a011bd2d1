import { describe, expect, it } from 'vitest';
import { detectNix, parseNixVersion, parseShowConfigJson, parseShowConfigText } from './detect.js';

const detectAll = { systems: null, features: null, mandatoryFeatures: [], maxJobs: null };

describe('detectNix', () => {
  it('reads system, extra platforms, features, max-jobs and the version from the installed Nix', async () => {
    const caps = await detectNix(detectAll);
    expect(caps.nixVersion).toMatch(/^\d+\.\d+/);
    expect(caps.os).toBe(process.platform === 'darwin' ? 'darwin' : 'linux');
    expect(caps.systems[0]).toMatch(/^[a-z0-9_]+-(linux|darwin)$/);
    expect(caps.maxJobs).toBeGreaterThanOrEqual(1);
    expect(caps.mandatoryFeatures).toEqual([]);
  });

  it('lets the agent configuration override what Nix reports', async () => {
    const caps = await detectNix({
      systems: ['riscv64-linux'],
      features: ['kvm'],
      mandatoryFeatures: ['big'],
      maxJobs: 7,
    });
    expect(caps).toMatchObject({
      systems: ['riscv64-linux'],
      features: ['kvm'],
      mandatoryFeatures: ['big'],
      maxJobs: 7,
    });
  });

  it('fails clearly when Nix is not installed', async () => {
    await expect(detectNix(detectAll, 'no-such-nix-binary')).rejects.toThrow();
  });
});

describe('show-config parsing', () => {
  it('understands the JSON format with { value } entries', () => {
    const json = JSON.stringify({
      system: { value: 'x86_64-linux' },
      'extra-platforms': { value: ['i686-linux'] },
      'system-features': { value: ['kvm', 'big-parallel'] },
      'max-jobs': { value: 4 },
    });
    expect(parseShowConfigJson(json)).toEqual({
      system: 'x86_64-linux',
      extraPlatforms: ['i686-linux'],
      systemFeatures: ['kvm', 'big-parallel'],
      maxJobs: 4,
    });
  });

  it('understands the plain text format', () => {
    const text =
      'extra-platforms = aarch64-darwin\nmax-jobs = 8\nsystem = x86_64-darwin\nsystem-features = benchmark nixos-test\n';
    expect(parseShowConfigText(text)).toEqual({
      system: 'x86_64-darwin',
      extraPlatforms: ['aarch64-darwin'],
      systemFeatures: ['benchmark', 'nixos-test'],
      maxJobs: 8,
    });
  });

  it('reads the version from nix --version output', () => {
    expect(parseNixVersion('nix (Nix) 2.8.0\n')).toBe('2.8.0');
    expect(parseNixVersion('nix (Lix, like Nix) 2.91.1\n')).toBe('2.91.1');
  });
});
