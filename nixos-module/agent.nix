# services.eka-ci.agent: an eka-ci builder host on NixOS. The agent runs as an unprivileged user against the host's
# nix-daemon (which builds in Nix's sandbox as its build users); the module configures that daemon for it.
{ config, lib, pkgs, ... }:
let
  common = import ./agent-common.nix { inherit lib pkgs; };
  cfg = config.services.eka-ci.agent;
  # systemd expands %-specifiers in ExecStart: a literal % is %%. `%d` is the unit's credentials directory.
  systemdArg = a: lib.escapeShellArg (lib.replaceStrings [ "%" ] [ "%%" ] a);
  argv = common.args cfg "@TOKEN@";
  execStart = lib.replaceStrings [ "@TOKEN@" ] [ "%d/agent-token" ] (lib.concatMapStringsSep " " systemdArg argv);
in
{
  options.services.eka-ci.agent = common.options;

  config = lib.mkIf cfg.enable {
    assertions = common.assertions cfg;

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.group;
      description = "eka-ci agent";
    };
    users.groups.${cfg.group} = { };

    nix.settings = common.nixSettings cfg;

    systemd.services.eka-ci-agent = {
      description = "eka-ci agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      # bubblewrap: the sandbox of repository checks; xz, zstd: NARs compressed for s3 caches.
      path = [ config.nix.package pkgs.bubblewrap pkgs.xz pkgs.zstd ] ++ cfg.extraPackages;
      environment = {
        NIX_REMOTE = "daemon";
        # Nix's client caches what it learns of binary caches under $XDG_CACHE_HOME (default ~/.cache, and a system
        # user's home is the read-only /var/empty).
        XDG_CACHE_HOME = "/var/cache/eka-ci-agent";
      };
      serviceConfig = import ./hardening.nix { bubblewrap = true; cgroups = true; } // {
        ExecStart = execStart;
        User = cfg.user;
        Group = cfg.group;
        # Build logs wait here until the coordinator has them (the agent reads $STATE_DIRECTORY).
        StateDirectory = "eka-ci-agent";
        StateDirectoryMode = "0700";
        CacheDirectory = "eka-ci-agent";
        CacheDirectoryMode = "0700";
        LoadCredential = [ "agent-token:${cfg.tokenFile}" ];
        Restart = "always";
        RestartSec = 5;
        # A first SIGTERM drains: running builds finish or are handed back before the agent exits.
        KillSignal = "SIGTERM";
        TimeoutStopSec = common.stopTimeout cfg;
      };
    };
  };
}
