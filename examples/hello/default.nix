# A tiny package set for the demo: plain derivations with /bin/sh as builder (no nixpkgs needed).
# `ekaci build examples/hello/default.nix` builds every attribute in dependency order on the embedded system.
let
  sh = name: attrs: script:
    derivation ({
      inherit name;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" script ];
    } // attrs);
in
rec {
  # A fixed-output derivation: its content is known in advance, so it goes to the download lane.
  greeting = sh "greeting" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "f3b574ec85caa05233803797ac001acd3b25d7a545cc5c189cf086c869272d1c";
  } "echo 'hello from eka-ci' > $out";

  words = sh "words" { } ''
    echo "splitting the greeting into words"
    read -r line < ${greeting}
    for w in $line; do echo "$w"; done > $out
  '';

  count = sh "count" { } ''
    n=0
    while read -r w; do n=$((n + 1)); done < ${words}
    echo "$n words" > $out
  '';

  shout = sh "shout" { } ''
    while read -r w; do printf '%s! ' "$w"; done < ${words} > $out
  '';

  hello = sh "hello" { } ''
    echo "building the final report"
    {
      read -r c < ${count}
      echo "greeting: $(while read -r l; do echo "$l"; done < ${greeting})"
      echo "count: $c"
      read -r s < ${shout}
      echo "shout: $s"
    } > $out
  '';
}
