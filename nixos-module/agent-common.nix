# What the NixOS and nix-darwin agent modules share: the options, the agent's command line, the host Nix settings
# the agent depends on, and the checks. Each module adds only its service manager's part.
{ lib, pkgs }:
let
  inherit (lib) mkOption mkEnableOption types literalExpression;
  lib' = import ./lib.nix { inherit lib; };
in
rec {
  options = {
    enable = mkEnableOption "an eka-ci agent: this host builds for an eka-ci coordinator";

    package = mkOption {
      type = types.package;
      default = pkgs.eka-ci;
      defaultText = literalExpression "pkgs.eka-ci (the flake's overlay, or its modules set it)";
      description = "The eka-ci package.";
    };

    user = mkOption { type = types.str; default = "eka-ci-agent"; description = "User the agent runs as (not root)."; };
    group = mkOption { type = types.str; default = "eka-ci-agent"; description = "Group the agent runs as."; };

    coordinator = mkOption {
      type = types.strMatching "[^[:space:]]+:[0-9]+";
      example = "ci.example.org:50051";
      description = "The coordinator's gRPC endpoint, host:port.";
    };

    tokenFile = mkOption {
      type = lib'.secretPath;
      description = "File holding this agent's token (`ekaci-coordinator agent-token create NAME`, or agentTokenFiles).";
    };

    systems = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "x86_64-linux" "i686-linux" ];
      description = "Systems this host builds; null takes Nix's `system` and `extra-platforms`.";
    };

    supportedFeatures = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "kvm" "big-parallel" ];
      description = "Features this host offers; null takes Nix's `system-features`.";
    };

    mandatoryFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Features every derivation built here must require (a host kept for big builds).";
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.attic-client pkgs.cachix ]";
      description = "More tools on the agent's PATH: the clients of `attic` and `cachix` caches the coordinator pushes to.";
    };

    maxJobs = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "Builds at once; null takes Nix's `max-jobs`.";
    };

    tls = {
      caFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "PEM root certificate of the coordinator's gRPC TLS; null connects without TLS.";
      };
      certFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "PEM client certificate, for a coordinator requiring mutual TLS.";
      };
      keyFile = mkOption {
        type = types.nullOr lib'.secretPath;
        default = null;
        description = "PEM key of the client certificate.";
      };
    };

    cache = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://ci.example.org/cache";
        description = "The coordinator's binary cache (its web address + /cache); added to the host's substituters.";
      };
      publicKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "ekaci-1:…";
        description = "The cache's public key: the `publicKey` the coordinator logs when ready (the public half of cacheSecretKeyFile).";
      };
    };

    trustedUser = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Make the agent's user a trusted user of the host's nix-daemon, so it sets substituters and keys itself.
        A trusted user is as powerful as root on the store; the default instead configures the host's Nix with the
        coordinator's cache (cache.url and cache.publicKey), which is all the agent needs.
      '';
    };

    nixSettings = mkOption {
      type = types.attrsOf types.anything;
      default = { };
      example = { sandbox = true; max-silent-time = 3600; };
      description = "More settings for the host's Nix (merged into nix.settings).";
    };

    drainGraceSeconds = mkOption {
      type = types.ints.unsigned;
      default = 100;
      description = ''
        On stop (SIGTERM), how long running builds may finish and report before they are stopped and handed back.
        The service manager's stop timeout is this plus 20 seconds, so the agent is never killed mid-drain.
      '';
    };

    cacheWaitSeconds = mkOption {
      type = types.ints.unsigned;
      default = 120;
      description = ''
        How long an output upload waits for the coordinator's cache to answer (the coordinator restarting) before
        the build is reported failed for infrastructure and retried; 0 fails at once.
      '';
    };

    checkMemoryMiB = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      description = "Memory of one repository check (its cgroup's limit), in MiB; 0 for none; null takes the agent's 4096.";
    };

    checkMaxProcesses = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      description = "Processes and threads of one repository check; 0 for none; null takes the agent's 1024.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More command-line arguments for ekaci-agent.";
    };
  };

  # The command line, given where the token file is at run time.
  args = cfg: tokenPath:
    [ "${cfg.package}/bin/ekaci-agent" "--coordinator" cfg.coordinator "--token-file" tokenPath "--store" "daemon" ]
    ++ lib.concatMap (s: [ "--system" s ]) (if cfg.systems == null then [ ] else cfg.systems)
    ++ lib.optionals (cfg.supportedFeatures != null) [ "--features" (lib.concatStringsSep "," cfg.supportedFeatures) ]
    ++ lib.optionals (cfg.mandatoryFeatures != [ ]) [ "--mandatory-features" (lib.concatStringsSep "," cfg.mandatoryFeatures) ]
    ++ lib.optionals (cfg.maxJobs != null) [ "--max-jobs" (toString cfg.maxJobs) ]
    ++ lib.optionals (cfg.tls.caFile != null) [ "--tls-ca" cfg.tls.caFile ]
    ++ lib.optionals (cfg.tls.certFile != null) [ "--tls-cert" cfg.tls.certFile ]
    ++ lib.optionals (cfg.tls.keyFile != null) [ "--tls-key" cfg.tls.keyFile ]
    ++ [ "--drain-grace" (toString cfg.drainGraceSeconds) "--cache-wait" (toString cfg.cacheWaitSeconds) ]
    ++ lib.optionals (cfg.checkMemoryMiB != null) [ "--check-memory-mib" (toString cfg.checkMemoryMiB) ]
    ++ lib.optionals (cfg.checkMaxProcesses != null) [ "--check-max-processes" (toString cfg.checkMaxProcesses) ]
    ++ cfg.extraArgs;

  # What the service manager waits for after SIGTERM before it kills: the drain and a margin to report.
  stopTimeout = cfg: cfg.drainGraceSeconds + 20;

  # What the host's nix-daemon must know for this agent (the agent checks it at start-up and names what is missing).
  nixSettings = cfg: lib.mkMerge [
    (lib.mkIf cfg.trustedUser { trusted-users = [ cfg.user ]; })
    (lib.mkIf (cfg.cache.url != null) {
      extra-substituters = [ cfg.cache.url ];
      extra-trusted-public-keys = [ cfg.cache.publicKey ];
    })
    cfg.nixSettings
  ];

  assertions = cfg: [
    {
      assertion = cfg.trustedUser || (cfg.cache.url != null && cfg.cache.publicKey != null);
      message = ''
        services.eka-ci.agent: set cache.url and cache.publicKey (the coordinator's cache and its key), or
        trustedUser = true: the host's nix-daemon ignores substituters an untrusted user asks for.
      '';
    }
    {
      assertion = (cfg.cache.url == null) == (cfg.cache.publicKey == null);
      message = "services.eka-ci.agent: cache.url and cache.publicKey go together.";
    }
    {
      assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
      message = "services.eka-ci.agent: tls.certFile and tls.keyFile go together.";
    }
    {
      assertion = cfg.user != "root";
      message = "services.eka-ci.agent: the agent runs as an unprivileged user of the host's nix-daemon, not root.";
    }
  ];
}
