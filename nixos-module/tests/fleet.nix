# NixOS VM test (flake check `vm`): a coordinator and two builder hosts, deployed with the modules, build the diamond
# submitted through the API; each builder takes the derivations only it has the feature for, so every edge crosses
# between hosts through the coordinator's cache. Written for machines with KVM and nixpkgs; eka-ci's own CI cannot
# run it (see the README).
{ self }:
{ lib, pkgs, ... }:
let
  # Test-only secrets: in a VM they may live in /etc (the modules refuse store paths, not /etc).
  cacheKey = {
    secret = "eka-ci-vm-test-1:gyOC6WXrF6B/nM2dEUhIMSnQyfm1bChgqwNeCKWv0upQrSzIhMyHwQ8LNnWZSIrQA6aWepdTTDqhV5ZrzMQtPA==";
    public = "eka-ci-vm-test-1:UK0syITMh8EPCzZ1mUiK0AOmlnqXU0w6oVeWa8zELTw=";
  };
  apiToken = "ekaci_vm-test-api-token-0123456789abcdef";
  agentToken = name: "ekaci_vm-test-${name}-token-0123456789abcdef";

  diamond = pkgs.writeText "diamond.nix" ''
    let
      mk = name: feature: { deps ? [ ], script }: derivation {
        inherit name deps;
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" script ];
        requiredSystemFeatures = [ feature ];
      };
    in
    rec {
      base = mk "base" "side-b" { script = "echo base > $out"; };
      left = mk "left" "side-a" { deps = [ base ]; script = "read b < ''${base}; echo left-$b > $out"; };
      right = mk "right" "side-b" { deps = [ base ]; script = "read b < ''${base}; echo right-$b > $out"; };
      top = mk "top" "side-a" { deps = [ left right ]; script = "read l < ''${left}; read r < ''${right}; echo $l $r > $out"; };
    }
  '';

  builder = name: feature: {
    imports = [ self.nixosModules.agent ];
    environment.etc."eka-ci/agent-token".text = agentToken name;
    nix.settings.system-features = [ feature ];
    services.eka-ci.agent = {
      enable = true;
      coordinator = "coordinator:50051";
      tokenFile = "/etc/eka-ci/agent-token";
      cache = { url = "http://coordinator:8080/cache"; publicKey = cacheKey.public; };
    };
  };
in
{
  name = "eka-ci-fleet";

  nodes = {
    coordinator = {
      imports = [ self.nixosModules.coordinator ];
      environment.etc = {
        "eka-ci/cache-key".text = cacheKey.secret;
        "eka-ci/api-token".text = apiToken;
        "eka-ci/builder1".text = agentToken "builder1";
        "eka-ci/builder2".text = agentToken "builder2";
      };
      environment.systemPackages = [ pkgs.curl pkgs.jq ];
      services.eka-ci.coordinator = {
        enable = true;
        openFirewall = true;
        cacheSecretKeyFile = "/etc/eka-ci/cache-key";
        apiTokenFiles.tester = "/etc/eka-ci/api-token";
        agentTokenFiles = { builder1 = "/etc/eka-ci/builder1"; builder2 = "/etc/eka-ci/builder2"; };
        settings.web.address = "0.0.0.0";
      };
    };
    builder1 = builder "builder1" "side-a";
    builder2 = builder "builder2" "side-b";
  };

  testScript = ''
    import json, time

    start_all()
    coordinator.wait_for_unit("eka-ci-coordinator.service")
    coordinator.wait_for_open_port(8080)
    for b in (builder1, builder2):
        b.wait_for_unit("eka-ci-agent.service")

    drvs = coordinator.succeed("nix-instantiate ${diamond} -A base -A left -A right -A top").split()
    auth = "-H 'Authorization: Bearer ${apiToken}'"
    body = json.dumps({"drvs": drvs})
    submitted = json.loads(coordinator.succeed(
        f"curl -sf {auth} -H 'Content-Type: application/json' -d '{body}' http://127.0.0.1:8080/api/v1/builds"))

    for _ in range(300):
        r = json.loads(coordinator.succeed(f"curl -sf {auth} http://127.0.0.1:8080{submitted['url']}"))
        if r["settled"]:
            break
        time.sleep(1)
    else:
        raise Exception("the builds did not settle")

    states = {b["drvPath"]: (b["state"], b.get("agent")) for b in r["builds"]}
    assert [states[d] for d in drvs] == [
        ("succeeded", "builder2"), ("succeeded", "builder1"), ("succeeded", "builder2"), ("succeeded", "builder1"),
    ], states
    # The builders ran as unprivileged users of their hosts' sandboxed daemons.
    builder1.succeed("journalctl -u nix-daemon | grep -q 'user eka-ci-agent'")
  '';
}
