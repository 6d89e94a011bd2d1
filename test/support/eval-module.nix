# Evaluates one eka-ci module with nixpkgs' own module system (lib.evalModules from the nixpkgs lib at `libPath`),
# the way NixOS or nix-darwin would, and returns what the module produced as plain data for the tests.
#
# There is no nixpkgs here: the NixOS / nix-darwin options the module sets but does not declare get small stand-in
# declarations below, and `pkgs` offers only what the module uses. Packages point at real directories of this
# machine (`tools` for nix, git and bubblewrap; `package` for eka-ci itself) so that the rendered unit can run.
# `pkgs.formats.toml` writes its value as JSON: nixpkgs turns that JSON into TOML with remarshal at build time; the
# tests do the same conversion.
{ libPath, module, configuration, package, tools }:
let
  lib = import (libPath + "/lib");
  inherit (lib) mkOption types;

  standinPackage = name: outPath: { type = "derivation"; inherit name outPath; meta.mainProgram = name; };

  pkgs = {
    eka-ci = standinPackage "eka-ci" package;
    nix = standinPackage "nix" tools;
    git = standinPackage "git" tools;
    bubblewrap = standinPackage "bubblewrap" tools;
    xz = standinPackage "xz" tools;
    zstd = standinPackage "zstd" tools;
    nix-eval-jobs = standinPackage "nix-eval-jobs" "/standin/nix-eval-jobs";
    formats.toml = { }: {
      type =
        let
          valueType = types.nullOr (types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]) // { description = "TOML value"; };
        in
        valueType;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
  };

  freeform = types.submodule { freeformType = types.attrsOf types.anything; };
  nixValue = types.oneOf [ types.bool types.int types.str ];

  # Declarations of the host options the eka-ci modules set, as NixOS and nix-darwin declare them (types only).
  standins = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      users.users = mkOption { type = types.attrsOf freeform; default = { }; };
      users.groups = mkOption { type = types.attrsOf freeform; default = { }; };
      users.knownUsers = mkOption { type = types.listOf types.str; default = [ ]; };
      users.knownGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      nix.package = mkOption { type = types.package; default = pkgs.nix; };
      nix.settings = mkOption {
        type = types.attrsOf (types.either (types.listOf nixValue) nixValue);
        default = { };
      };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options = {
            path = mkOption { type = types.listOf types.package; default = [ ]; };
            environment = mkOption { type = types.attrsOf types.str; default = { }; };
            serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
          };
        });
      };
      launchd.daemons = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options.serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
        });
      };
    };
  };

  evaluated = lib.evalModules {
    modules = [ standins module configuration { _module.args.pkgs = pkgs; } ];
  };
  inherit (evaluated) config;

  # What NixOS makes of a service's `path`: each package's bin and sbin on PATH, before the default PATH.
  withPath = service: service // {
    environment = service.environment // {
      PATH = lib.concatStringsSep ":" (lib.concatMap (p: [ "${p}/bin" "${p}/sbin" ]) service.path);
    };
    path = map (p: p.name) service.path;
  };
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  services = lib.mapAttrs (_: withPath) config.systemd.services;
  launchd = lib.mapAttrs (_: d: d.serviceConfig) config.launchd.daemons;
  users = config.users;
  firewall = config.networking.firewall;
  nixSettings = config.nix.settings;
}
