# Plain derivations built by /bin/sh: no nixpkgs. The nonce (written by examples/make-repo.sh) makes every
# generated repository's derivations new, so each test run really builds.
{
  mk =
    { name, version, script, deps ? [ ], features ? [ ] }:
    derivation {
      name = "${name}-${version}";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" script ];
      nonce = import ./nonce.nix;
      requiredSystemFeatures = features;
      inherit deps;
    };
}
