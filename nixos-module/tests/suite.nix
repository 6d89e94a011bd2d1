# NixOS VM test (flake check `tests`): eka-ci's own test suite on a NixOS machine, which has everything the suite
# uses: a multi-user nix-daemon with the sandbox on, bubblewrap, git, unshare, systemd-analyze, nixpkgs' lib.
# The suite was written on Debian, where plain `/bin/sh` builders find their tools in /bin and /usr/bin; the machine
# gets those directories. Written for machines with KVM and nixpkgs; eka-ci's own CI cannot run it (see the README).
{ self }:
{ lib, pkgs, ... }:
let
  # With its devDependencies: the suite runs on vitest.
  package = self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci.overrideAttrs { dontNpmPrune = true; };
  tools = pkgs.buildEnv {
    name = "debian-like-tools";
    paths = [ pkgs.bash pkgs.coreutils pkgs.gnugrep pkgs.gnused pkgs.findutils ];
  };
in
{
  name = "eka-ci-test-suite";

  nodes.machine = {
    virtualisation = { cores = 2; memorySize = 4096; diskSize = 8192; writableStore = true; };
    nix.settings.sandbox = false;
    environment.systemPackages = [ pkgs.nodejs_20 pkgs.git pkgs.bubblewrap pkgs.util-linux pkgs.systemd pkgs.nix ];
    system.activationScripts.debianLikeBin = ''
      mkdir -p /usr/bin /lib
      for f in ${tools}/bin/*; do
        ln -sfn "$f" /usr/bin/"$(basename "$f")"
        [ -e /bin/"$(basename "$f")" ] || ln -sfn "$f" /bin/"$(basename "$f")"
      done
    '';
  };

  testScript = ''
    machine.wait_for_unit("multi-user.target")
    machine.succeed(
        "cp -r ${package}/lib/node_modules/eka-ci /root/eka-ci && chmod -R u+w /root/eka-ci",
        "cp -r ${self}/test ${self}/vitest.config.ts ${self}/tsconfig.json /root/eka-ci/",
    )
    machine.succeed(
        "cd /root/eka-ci && EKACI_NIXPKGS_LIB=${pkgs.path} NIX_REMOTE=local npx vitest run >&2",
        timeout=3600,
    )
  '';
}
