# The eka-ci package: the three commands (ekaci, ekaci-coordinator, ekaci-agent) with their runtime tools.
# Dependencies come from package-lock.json through importNpmLock (no vendor hash to keep in sync); better-sqlite3 is
# compiled from source against this Node (its prebuilt binaries would be a download).
{ lib
, buildNpmPackage
, importNpmLock
, nodejs_20
, python3
, makeWrapper
, nix
, git
, bubblewrap
, stdenv
}:
let
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../package.json
      ../package-lock.json
      ../tsconfig.json
      ../tsconfig.build.json
      ../bin
      ../agent
      ../cli
      ../common
      ../coordinator
      ../examples
      ../proto
      ../web
    ];
  };
in
buildNpmPackage {
  pname = "eka-ci";
  version = (lib.importJSON ../package.json).version;
  inherit src;
  nodejs = nodejs_20;

  npmDeps = importNpmLock { npmRoot = src; };
  npmConfigHook = importNpmLock.npmConfigHook;

  nativeBuildInputs = [ python3 makeWrapper ];
  # node-gyp builds better-sqlite3 here instead of fetching a binary.
  npmFlags = [ "--build-from-source" ];
  env.npm_config_build_from_source = "true";

  # `npm run build` compiles TypeScript to dist/ and bundles the web UI into dist/web; devDependencies are pruned
  # afterwards.
  npmBuildScript = "build";

  postInstall = ''
    for cmd in ekaci ekaci-coordinator ekaci-agent; do
      wrapProgram "$out/bin/$cmd" \
        --suffix PATH : ${lib.makeBinPath ([ nix git ] ++ lib.optional stdenv.isLinux bubblewrap)}
    done
  '';

  meta = {
    description = "Continuous integration for Nix package sets: should I merge this pull request?";
    license = lib.licenses.mit;
    mainProgram = "ekaci";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
