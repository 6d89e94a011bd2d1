# The demo repository's package set before the change (see examples/review/README.md).
let
  inherit (import ./lib.nix) mk;
in
rec {
  greeting = mk {
    name = "greeting";
    version = "1.0";
    script = "echo 'hello' > $out";
  };
  hello = mk {
    name = "hello";
    version = "2.12";
    deps = [ greeting ];
    script = ''
      echo "#!/bin/sh" > $out
      echo "cat $deps" >> $out
    '';
  };
  cowsay = mk {
    name = "cowsay";
    version = "3.7";
    script = "echo 'cowsay needs a fix: exit 1 from its test suite'; exit 1";
  };
  figlet = mk {
    name = "figlet";
    version = "2.2.5";
    script = "echo figlet > $out";
  };
}
