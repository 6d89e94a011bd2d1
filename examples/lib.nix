# Plain derivations built by /bin/sh: no nixpkgs. examples/make-repo.sh puts this file, and a nonce.nix, into every
# commit it makes; a fresh nonce makes every generated repository's derivations new, so each run really builds.
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
