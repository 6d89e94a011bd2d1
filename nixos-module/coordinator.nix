# services.eka-ci.coordinator: the eka-ci coordinator as a hardened systemd service.
#
# `settings` is the coordinator's TOML configuration (README "Configuration"), written as Nix; the common keys have
# typed options below, everything else passes through as is and is checked by the coordinator when it starts.
# Secrets never enter the Nix store: each is a file on the host handed to the service with systemd's
# LoadCredential=, and the configuration names the credential (`*_credential` keys).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;
  cfg = config.services.eka-ci.coordinator;
  lib' = import ./lib.nix { inherit lib; };
  toml = pkgs.formats.toml { };

  # name = path pairs become `LoadCredential=name:path` and the configuration's `*_credential = "name"`.
  credentials =
    lib.mapAttrs' (name: file: lib.nameValuePair "agent-token-${name}" file) cfg.agentTokenFiles
    // lib.mapAttrs' (name: file: lib.nameValuePair "api-token-${name}" file) cfg.apiTokenFiles
    // lib.mapAttrs' (id: app: lib.nameValuePair "github-app-${id}" app.credentialsFile) cfg.githubApps
    // lib.optionalAttrs (cfg.webhookSecretFile != null) { webhook-secret = cfg.webhookSecretFile; }
    // lib.optionalAttrs (cfg.cacheSecretKeyFile != null) { cache-secret-key = cfg.cacheSecretKeyFile; };

  tokenTable = prefix: files: lib.mapAttrsToList (name: _: { inherit name; token_credential = "${prefix}-${name}"; }) files;

  generated = lib.filterAttrs (_: v: v != [ ]) {
    agent_tokens = tokenTable "agent-token" cfg.agentTokenFiles;
    api_tokens = tokenTable "api-token" cfg.apiTokenFiles;
    github_apps = lib.mapAttrsToList
      (id: app: { inherit id; credentials.systemd-credential.name = "github-app-${id}"; } // app.settings)
      cfg.githubApps;
  };
  secretSettings =
    lib.optionalAttrs (cfg.webhookSecretFile != null) { security.webhook_secret_credential = "webhook-secret"; }
    // lib.optionalAttrs (cfg.cacheSecretKeyFile != null) { cache.secret_key_credential = "cache-secret-key"; };

  # TOML has no null: an unset optional key is left out.
  rendered = lib'.withoutNulls (lib.recursiveUpdate (lib.recursiveUpdate cfg.settings secretSettings) generated);
  configFile = toml.generate "eka-ci-coordinator.toml" rendered;

  freeform = types.submodule { freeformType = toml.type; };
in
{
  options.services.eka-ci.coordinator = {
    enable = mkEnableOption "the eka-ci coordinator (derivation graph, queues, binary cache, GitHub App)";

    package = mkOption {
      type = types.package;
      default = pkgs.eka-ci;
      defaultText = literalExpression "pkgs.eka-ci (the flake's overlay, or its nixosModules set it)";
      description = "The eka-ci package.";
    };

    user = mkOption { type = types.str; default = "eka-ci"; description = "User the coordinator runs as."; };
    group = mkOption { type = types.str; default = "eka-ci"; description = "Group the coordinator runs as."; };

    settings = mkOption {
      default = { };
      description = ''
        The coordinator's configuration, rendered to TOML. Keys are those of the README's configuration reference;
        the coordinator refuses unknown keys and bad values at start-up, naming them.
      '';
      type = types.submodule {
        freeformType = toml.type;
        options = {
          data_dir = mkOption {
            type = types.str;
            default = "/var/lib/eka-ci";
            description = "Database, binary cache and logs. The default is the unit's StateDirectory.";
          };
          web = mkOption {
            default = { };
            description = "The HTTP server: web UI, API, webhooks and the binary cache.";
            type = types.submodule {
              freeformType = toml.type;
              options = {
                address = mkOption { type = types.str; default = "127.0.0.1"; description = "Address to listen on."; };
                port = mkOption { type = types.port; default = 8080; description = "Port to listen on."; };
                public_url = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "https://ci.example.org";
                  description = "URL under which users and GitHub reach the web server (links in check runs).";
                };
              };
            };
          };
          grpc = mkOption {
            default = { };
            description = "The endpoint agents connect to.";
            type = types.submodule {
              freeformType = toml.type;
              options = {
                address = mkOption {
                  type = types.str;
                  default = "0.0.0.0";
                  description = "Address to listen on; agents on other hosts need a reachable one.";
                };
                port = mkOption { type = types.port; default = 50051; description = "Port to listen on."; };
              };
            };
          };
          local_agent = mkOption {
            default = { };
            description = "The agent the coordinator may run itself.";
            type = types.submodule {
              freeformType = toml.type;
              options.enabled = mkOption {
                type = types.bool;
                default = false;
                description = ''
                  Build on the coordinator host too. Off by default: builder hosts run services.eka-ci.agent. When on,
                  the coordinator's user needs the host's Nix configured as for an agent (see that module).
                '';
              };
            };
          };
          evaluation = mkOption {
            default = { };
            description = "How repository code is evaluated (always in a bubblewrap sandbox unless turned off).";
            type = freeform;
          };
        };
      };
    };

    agentTokenFiles = mkOption {
      type = types.attrsOf lib'.secretPath;
      default = { };
      example = { mac-minis = "/run/secrets/eka-ci/mac-minis"; };
      description = "Agent tokens: agent name → file holding its token (generate one with `openssl rand -hex 32`).";
    };

    apiTokenFiles = mkOption {
      type = types.attrsOf lib'.secretPath;
      default = { };
      description = "API tokens: name → file holding the token.";
    };

    webhookSecretFile = mkOption {
      type = types.nullOr lib'.secretPath;
      default = null;
      description = "File holding the GitHub webhook secret (required once a GitHub App is configured).";
    };

    cacheSecretKeyFile = mkOption {
      type = types.nullOr lib'.secretPath;
      default = null;
      description = ''
        File holding the binary cache's signing key (`nix-store --generate-binary-cache-key`). Without one, the
        coordinator creates a key in its data directory on first start.
      '';
    };

    githubApps = mkOption {
      default = { };
      description = "GitHub Apps, by the configuration's name for each.";
      type = types.attrsOf (types.submodule {
        options = {
          credentialsFile = mkOption {
            type = lib'.secretPath;
            description = "File with `GITHUB_APP_ID=…` and `GITHUB_APP_PRIVATE_KEY=…` (or the same as JSON).";
          };
          settings = mkOption {
            type = freeform;
            default = { };
            example = { permissions.allowed_repos = [ "my-org/*" ]; };
            description = "The rest of the app's `[[github_apps]]` entry: permissions, api_url.";
          };
        };
      });
    };

    nixEvalJobs = mkOption {
      type = types.bool;
      default = false;
      description = "Put nix-eval-jobs on the service's PATH; the coordinator then evaluates with it.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the web and gRPC ports in the firewall.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.githubApps == { } || cfg.webhookSecretFile != null
          || (cfg.settings.security.allow_insecure_webhooks or false)
          || lib.hasAttrByPath [ "security" "webhook_secret_file" ] cfg.settings;
        message = "services.eka-ci.coordinator: GitHub Apps need webhookSecretFile (the secret set in the app).";
      }
    ];

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.group;
      home = cfg.settings.data_dir;
      description = "eka-ci coordinator";
    };
    users.groups.${cfg.group} = { };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.settings.web.port cfg.settings.grpc.port ];

    systemd.services.eka-ci-coordinator = {
      description = "eka-ci coordinator";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      # nix: the client of the host's daemon (evaluation, cache); git: checkouts; bubblewrap: the evaluation sandbox.
      path = [ config.nix.package pkgs.git pkgs.bubblewrap ] ++ lib.optional cfg.nixEvalJobs pkgs.nix-eval-jobs;
      environment.NODE_ENV = "production";
      serviceConfig = import ./hardening.nix { bubblewrap = true; } // {
        ExecStart = "${cfg.package}/bin/ekaci-coordinator --config ${configFile}";
        User = cfg.user;
        Group = cfg.group;
        StateDirectory = mkIf (cfg.settings.data_dir == "/var/lib/eka-ci") "eka-ci";
        StateDirectoryMode = "0750";
        ReadWritePaths = mkIf (cfg.settings.data_dir != "/var/lib/eka-ci") [ cfg.settings.data_dir ];
        LoadCredential = lib.mapAttrsToList (name: file: "${name}:${file}") credentials;
        Restart = "on-failure";
        RestartSec = 5;
        # A first SIGTERM drains: builds in flight are handed back, logs flushed.
        KillSignal = "SIGTERM";
        TimeoutStopSec = 60;
      };
    };
  };
}
