{
  description = "eka-ci: continuous integration for Nix package sets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      linuxSystems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = list: f: nixpkgs.lib.genAttrs list (system: f nixpkgs.legacyPackages.${system});
      app = pkgs: program: {
        type = "app";
        program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci}/bin/${program}";
      };
    in
    {
      packages = forAll systems (pkgs: rec {
        eka-ci = pkgs.callPackage ./packaging/package.nix { };
        default = eka-ci;
      });

      apps = forAll systems (pkgs: {
        default = app pkgs "ekaci";
        ekaci = app pkgs "ekaci";
        coordinator = app pkgs "ekaci-coordinator";
        agent = app pkgs "ekaci-agent";
      });

      overlays.default = final: _prev: { eka-ci = final.callPackage ./packaging/package.nix { }; };

      nixosModules = {
        coordinator = { pkgs, lib, ... }: {
          imports = [ ./nixos-module/coordinator.nix ];
          services.eka-ci.coordinator.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci;
        };
        agent = { pkgs, lib, ... }: {
          imports = [ ./nixos-module/agent.nix ];
          services.eka-ci.agent.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci;
        };
        default = { imports = [ self.nixosModules.coordinator self.nixosModules.agent ]; };
      };

      darwinModules = {
        agent = { pkgs, lib, ... }: {
          imports = [ ./nixos-module/darwin-agent.nix ];
          services.eka-ci.agent.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci;
        };
        default = self.darwinModules.agent;
      };

      devShells = forAll systems (pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.nodejs_20 pkgs.nix pkgs.git pkgs.python3 pkgs.sqlite ]
            ++ nixpkgs.lib.optionals pkgs.stdenv.isLinux [ pkgs.bubblewrap pkgs.util-linux pkgs.systemd pkgs.chromium ];
          # The module tests evaluate the modules with this nixpkgs' lib (see test/packaging.test.ts).
          EKACI_NIXPKGS_LIB = "${nixpkgs}";
        };
      });

      checks = forAll linuxSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.eka-ci;
        # Coordinator and two agents on three machines build the diamond.
        vm = pkgs.testers.runNixOSTest (import ./nixos-module/tests/fleet.nix { inherit self; });
        # The whole test suite, in a VM that has what the tests use: a multi-user nix-daemon, bubblewrap, git.
        tests = pkgs.testers.runNixOSTest (import ./nixos-module/tests/suite.nix { inherit self; });
      });
    };
}
