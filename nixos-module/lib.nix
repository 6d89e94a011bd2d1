# Small helpers shared by the eka-ci modules.
{ lib }:
{
  # A secret's file on the host, as a string: a Nix path literal would copy the secret into the world-readable store.
  secretPath = lib.types.addCheck lib.types.str (s: lib.hasPrefix "/" s && !lib.hasPrefix builtins.storeDir s) // {
    description = "absolute path of a file outside the Nix store, as a string";
  };

  # Drops null values at every depth (TOML has no null; an unset optional key is left out).
  withoutNulls =
    let
      go = v:
        if builtins.isAttrs v then lib.mapAttrs (_: go) (lib.filterAttrs (_: x: x != null) v)
        else if builtins.isList v then map go v
        else v;
    in
    go;
}
