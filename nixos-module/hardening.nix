# systemd sandboxing shared by the eka-ci units (the NixOS modules use it; packaging/*.service repeat it and a test
# keeps them equal). `bubblewrap`: the service runs bubblewrap itself (the coordinator evaluates pull requests in
# it), which needs user namespaces and a /proc it may mount again: measured on Linux 6.x, bubblewrap's `--proc`
# fails with EPERM under ProtectKernelTunables, ProtectKernelLogs and ProcSubset=pid (each leaves a locked mount
# on /proc), so those stay off for it. NoNewPrivileges and an empty capability bounding set do not bother it. The
# coordinator runs bubblewrap to evaluate, an agent to run repository checks. `cgroups`: the service gets a cgroup
# subtree of its own (Delegate) that it may write, where an agent puts each check under memory and process limits.
{ bubblewrap, cgroups ? false }:
{
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  ProtectClock = true;
  ProtectHostname = true;
  ProtectControlGroups = !cgroups;
  ProtectKernelModules = true;
  ProtectKernelTunables = !bubblewrap;
  ProtectKernelLogs = !bubblewrap;
  ProtectProc = "invisible";
  ProcSubset = if bubblewrap then "all" else "pid";
  RestrictNamespaces = if bubblewrap then "user mnt pid net ipc uts cgroup" else true;
  # AF_NETLINK: bubblewrap brings up the loopback interface of the network namespace it creates.
  RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ] ++ (if bubblewrap then [ "AF_NETLINK" ] else [ ]);
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  # Node's JIT writes code it then runs.
  MemoryDenyWriteExecute = false;
  SystemCallArchitectures = "native";
  SystemCallFilter = [ "@system-service" ] ++ (if bubblewrap then [ "@mount" ] else [ ]);
  UMask = "0077";
}
// (if cgroups then { Delegate = true; } else { })
