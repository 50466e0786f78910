#!/usr/bin/env python3
"""Writes deploy/kubernetes/seccomp-ferry.json: the seccomp profile ferry's containers
run under. It allows what ferryd's systemd unit allows (SystemCallFilter=@system-service
userfaultfd, minus @privileged and the other groups the unit denies), expanded with
`systemd-analyze syscall-filter`, so the two deployments grant the same system calls:
io_uring and userfaultfd included (the runtimes' default profiles block io_uring), mount,
module loading, reboot, ptrace and the like refused with EPERM.

    scripts/gen-seccomp.py [OUT]     (scripts/check-deploy.sh checks the file is current)
"""
import json
import subprocess
import sys

ALLOW = ["@system-service", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register"]
DENY = ["@privileged", "@mount", "@swap", "@reboot", "@raw-io", "@module", "@obsolete", "@cpu-emulation", "@debug"]


def expand(name, seen):
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = set()
    lines = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True, capture_output=True, text=True).stdout.splitlines()
    for line in lines[1:]:
        s = line.strip()
        if not s:
            break
        if not s.startswith("#"):
            out |= expand(s, seen)
    return out


def main():
    allow = set().union(*(expand(n, set()) for n in ALLOW))
    deny = set().union(*(expand(n, set()) for n in DENY))
    # The runtime (runc, containerd) may install the filter before it sets the user and
    # groups and execs the entrypoint: those calls must pass (the process holds no
    # capability to misuse them with: ferry's containers run with IPC_LOCK only).
    runtime = {"execve", "setgroups", "setuid", "setgid", "setresuid", "setresgid", "setfsuid", "setfsgid", "capget", "capset", "prctl"}
    names = sorted((allow - deny) | runtime)
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}],
    }
    out = sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes/seccomp-ferry.json"
    with open(out, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")


main()
