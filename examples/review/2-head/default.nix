# The demo repository's package set after the change: greeting 1.1 says more (and grows past the 20 % size
# check), hello picks it up through its dependency, cowsay is fixed, and lolcat is new.
let
  inherit (import ./lib.nix) mk;
in
rec {
  greeting = mk {
    name = "greeting";
    version = "1.1";
    script = "echo 'hello, and welcome to this rather longer greeting of version 1.1' > $out";
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
    version = "3.7.1";
    script = "echo 'fixed the test suite'; echo cowsay > $out";
  };
  figlet = mk {
    name = "figlet";
    version = "2.2.5";
    script = "echo figlet > $out";
  };
  lolcat = mk {
    name = "lolcat";
    version = "100.0.1";
    script = "echo lolcat > $out";
  };
}
