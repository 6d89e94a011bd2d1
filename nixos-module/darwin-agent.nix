# services.eka-ci.agent for nix-darwin: the same options as the NixOS module, run as a launchd daemon. macOS has
# no systemd credentials: tokenFile must be readable by the agent's user (mode 0400, owned by it).
{ config, lib, pkgs, ... }:
let
  common = import ./agent-common.nix { inherit lib pkgs; };
  cfg = config.services.eka-ci.agent;
  stateDir = "/var/lib/eka-ci-agent";
in
{
  options.services.eka-ci.agent = common.options // {
    uid = lib.mkOption {
      type = lib.types.int;
      default = 531;
      description = "uid of the agent's user (nix-darwin creates users with a fixed uid).";
    };
    gid = lib.mkOption {
      type = lib.types.int;
      default = 531;
      description = "gid of the agent's group.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = common.assertions cfg;

    users.users.${cfg.user} = {
      uid = cfg.uid;
      gid = cfg.gid;
      home = stateDir;
      createHome = true;
      shell = "/usr/bin/false";
      isHidden = true;
      description = "eka-ci agent";
    };
    users.groups.${cfg.group} = { gid = cfg.gid; description = "eka-ci agent"; };
    users.knownUsers = [ cfg.user ];
    users.knownGroups = [ cfg.group ];

    nix.settings = common.nixSettings cfg;

    launchd.daemons.eka-ci-agent.serviceConfig = {
      Label = "org.eka-ci.agent";
      ProgramArguments = common.args cfg cfg.tokenFile;
      UserName = cfg.user;
      GroupName = cfg.group;
      RunAtLoad = true;
      KeepAlive = true;
      # launchd sends SIGTERM, then SIGKILL after this: time for running builds to be handed back.
      ExitTimeOut = common.stopTimeout cfg;
      WorkingDirectory = stateDir;
      StandardOutPath = "/var/log/eka-ci-agent.log";
      StandardErrorPath = "/var/log/eka-ci-agent.log";
      EnvironmentVariables = {
        NIX_REMOTE = "daemon";
        STATE_DIRECTORY = stateDir;
        PATH = lib.concatMapStrings (p: "${p}/bin:") ([ config.nix.package pkgs.xz pkgs.zstd ] ++ cfg.extraPackages)
          + "/usr/bin:/bin:/usr/sbin:/sbin";
      };
    };
  };
}
