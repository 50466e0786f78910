#!/usr/bin/env python3
"""Checks the rendered Kubernetes tree (kubectl kustomize deploy/) for what
kubernetes-validate cannot see:

- every container requests what it limits, whole CPUs and memory: Guaranteed QoS;
- every container that runs ferryctl or ferryd requests an RDMA device, and none runs
  seccomp-unconfined;
- ferryd has liveness and readiness probes on its metrics port, its control socket on a
  hostPath, and its metrics not on loopback;
- the PodMonitor scrapes a port the DaemonSet declares;
- the PrometheusRule carries exactly the groups of deploy/prometheus/ferry-rules.yaml
  (which promtool tests), and the seccomp profile allows io_uring and userfaultfd.

    kubectl kustomize deploy/ | scripts/check-k8s.py deploy/prometheus/ferry-rules.yaml
"""
import json
import sys

import yaml


def fail(msg):
    print(f"check-k8s: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ["Namespace", "ConfigMap", "Secret", "DaemonSet", "PodMonitor", "PrometheusRule"]:
        if kind not in by_kind:
            fail(f"no {kind} in the rendered tree")
    (ds,) = by_kind["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    for c in containers:
        res = c.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        if req != lim:
            fail(f"container {c['name']}: requests {req} differ from limits {lim} (not Guaranteed QoS)")
        cpu = str(lim.get("cpu", ""))
        if not cpu.isdigit() or int(cpu) < 1:
            fail(f"container {c['name']}: cpu {cpu!r} is not a whole number of CPUs (no exclusive cores)")
        if "memory" not in lim:
            fail(f"container {c['name']}: no memory limit")
        sc = c.get("securityContext", {})
        if sc.get("seccompProfile", {}).get("type") in (None, "Unconfined"):
            fail(f"container {c['name']}: no seccomp profile")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"container {c['name']}: allowPrivilegeEscalation is not false")
        runs_ferry = any(w in " ".join(c.get("command", []) + c.get("args", [])) for w in ("ferryctl", "ferryd"))
        if runs_ferry and not any(k.startswith("rdma/") for k in lim):
            fail(f"container {c['name']} runs ferry (probes or uses verbs) but requests no RDMA device")
    (ferryd,) = [c for c in pod["containers"] if c["name"] == "ferryd"]
    ports = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}
    for probe in ["livenessProbe", "readinessProbe"]:
        port = ferryd.get(probe, {}).get("httpGet", {}).get("port")
        if port not in ports:
            fail(f"ferryd: {probe} missing or not on a declared port ({port!r})")
    if ferryd["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("ferryd: readiness is not /readyz (which answers 503 while draining)")
    command = " ".join(ferryd["command"])
    if "127.0.0.1:9464" in command or "--metrics" not in command:
        fail("ferryd: metrics on the node's loopback, where no scraper reaches")
    vols = {v["name"]: v for v in pod["volumes"]}
    run = [m for m in ferryd["volumeMounts"] if m["mountPath"] == "/run/ferry"]
    if not run or "hostPath" not in vols[run[0]["name"]]:
        fail("ferryd: /run/ferry (the control socket) is not on a hostPath VMMs can reach")
    (pm,) = by_kind["PodMonitor"]
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if ep["port"] not in ports:
            fail(f"PodMonitor scrapes port {ep['port']!r}, which the DaemonSet does not declare")
    (rule,) = by_kind["PrometheusRule"]
    with open(sys.argv[1]) as f:
        tested = yaml.safe_load(f)
    if rule["spec"] != tested:
        fail(f"the PrometheusRule's groups differ from {sys.argv[1]}: regenerate deploy/kubernetes/prometheusrule.yaml")
    seccomp = [cm for cm in by_kind["ConfigMap"] if cm["metadata"]["name"].startswith("ferry-seccomp")]
    if not seccomp:
        fail("no ferry-seccomp ConfigMap")
    profile = json.loads(seccomp[0]["data"]["ferry.json"])
    allowed = {n for s in profile["syscalls"] if s["action"] == "SCMP_ACT_ALLOW" for n in s["names"]}
    for need in ["io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "mlock"]:
        if need not in allowed:
            fail(f"the seccomp profile refuses {need}")
    for never in ["mount", "ptrace", "init_module", "kexec_load", "bpf"]:
        if never in allowed:
            fail(f"the seccomp profile allows {never}")
    print(f"check-k8s: {len(docs)} objects; Guaranteed QoS, RDMA requests, probes, hostPath socket, seccomp and rules ok")


main()
