#!/usr/bin/env python3
"""ferry against QEMU's own migration, in one run: the same guest (QEMU 7.2, no guest OS,
SeaBIOS idling, RAM in a memory-backend-file holding the 1 GiB guest-memory corpus)
migrated

  - directly, QEMU to QEMU over TCP: default settings with max-bandwidth raised, and
    multifd with 4 channels (+ zstd on the slow link);
  - through ferry in stream mode: QEMU -> `ferryctl proxy` -> `ferryctl proxy` -> QEMU;

on loopback and over a 1 Gbit/s link (two network namespaces joined by a veth pair,
`tc tbf` on both ends). Also region mode on loopback (`ferryctl bench migrate`, the same
corpus recipe, a guest at rest), over io_uring and over sockets, against QEMU's
multifd-4, with CPU seconds per GiB: both ferryd (the bench's own figure) against both
QEMU processes (from `migrate` until the destination runs).

Per run: total time (from `migrate` until the destination QEMU has loaded everything and
runs), downtime (the source's STOP event to the destination's RESUME event, both QMP
timestamps on this host's clock; QEMU's own `downtime` figure is printed beside it),
bytes QEMU transferred and bytes on the wire (veth counters on the link; the proxies'
reports on loopback). Prints one JSON line per run and a summary with the ratios.

    cargo build --release && sudo benches/bench_qemu.py [--size-mib 1024] [--reps 1]

Needs root (namespaces, tc), qemu-system-x86_64 and /dev/kvm (TCG otherwise: slower).
"""
import argparse, json, os, shutil, socket, subprocess, tempfile, threading, time
from statistics import median

from benchlib import FERRYCTL, corpus, preflight, setup_link as _setup_link, sh, teardown_link as _teardown_link

NS_A, NS_B, IP_A, IP_B = "ferry-q-a", "ferry-q-b", "10.78.0.1", "10.78.0.2"
SETTLE_S = 6  # SeaBIOS POST re-dirties all RAM; after it the vCPU halts
UNLIMITED = 100 << 30


def setup_link(mbit):
    _setup_link((NS_A, NS_B), ("fq-a", "fq-b"), (IP_A, IP_B), mbit, "20ms", both_ends=True)


def teardown_link():
    _teardown_link((NS_A, NS_B))


def veth_tx():
    j = json.loads(sh("ip", "-n", NS_A, "-s", "-j", "link", "show", "fq-a").stdout)
    return j[0]["stats64"]["tx"]["bytes"]


class QMP:
    def __init__(self, path):
        t0 = time.time()
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.time() - t0 > 30:
                    raise
                time.sleep(0.05)
        s.settimeout(300)
        self.f = s.makefile("rwb")
        self.events = []
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r.get("return")

    def event_time(self, name):
        for e in self.events:
            if e["event"] == name:
                return stamp(e)
        return None

    def wait_event(self, name, match=lambda data: True):
        """The first event `name` whose data matches, seen before or waited for."""
        i = 0
        while True:
            while i < len(self.events):
                e = self.events[i]
                i += 1
                if e["event"] == name and match(e.get("data", {})):
                    return e
            r = self._read()
            if "event" in r:
                self.events.append(r)


def stamp(event):
    """A QMP event's timestamp: this host's wall clock, as time.time()."""
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


def accel():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return "kvm"
    except OSError:
        return "tcg"


def qemu(ns, size_mib, ram, qmp, extra, log):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [
        "qemu-system-x86_64", "-machine", f"pc,accel={accel()},memory-backend=mem", "-smp", "1", "-m", f"{size_mib}M",
        "-object", f"memory-backend-file,id=mem,size={size_mib}M,mem-path={ram},share=on",
        "-nographic", "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off"] + extra
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def proxy(ns, args, key, out, log):
    """A `ferryctl proxy`, returned once it says it listens; its stderr goes to `log`."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [FERRYCTL, "proxy", *args, "--key", key, "--json"]
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "info"})
    for line in p.stderr:
        log.write(line)
        if line.startswith("ferry proxy:"):
            threading.Thread(target=lambda: [log.write(l) for l in p.stderr], daemon=True).start()
            return p
    raise RuntimeError(f"ferryctl proxy exited before it listened (status {p.wait()})")


def one(work, size_mib, src_img, link, mode, via_ferry, compress, port):
    """One migration. mode: default | multifd4 | multifd4-zstd (QEMU's own settings)."""
    ns_a, ns_b = (NS_A, NS_B) if link else (None, None)
    host_b = IP_B if link else "127.0.0.1"
    src_ram, dst_ram = os.path.join(work, "src.ram"), os.path.join(work, "dst.ram")
    subprocess.run(["cp", "--sparse=never", src_img, src_ram], check=True)
    with open(dst_ram, "wb") as f:
        f.truncate(size_mib << 20)
    sq_path, dq_path = os.path.join(work, "s.qmp"), os.path.join(work, "d.qmp")
    log = open(os.path.join(work, "run.log"), "a")
    procs = []
    try:
        dp = qemu(ns_b, size_mib, dst_ram, dq_path, ["-incoming", "defer"], log)
        sp = qemu(ns_a, size_mib, src_ram, sq_path, [], log)
        procs += [sp, dp]
        t_start = time.time()
        dq, sq = QMP(dq_path), QMP(sq_path)
        caps = {"default": {}, "multifd4": {"multifd": True}, "multifd4-zstd": {"multifd": True}}[mode]
        # MIGRATION events on the source, to wait on instead of polling its status.
        sq.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        params = {"default": {}, "multifd4": {"multifd-channels": 4},
                  "multifd4-zstd": {"multifd-channels": 4, "multifd-compression": "zstd"}}[mode]
        for q in (sq, dq):
            if caps:
                q.cmd("migrate-set-capabilities", capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            if params:
                q.cmd("migrate-set-parameters", **params)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
        reports = {}
        if via_ferry:
            key = os.path.join(work, "key")
            if not os.path.exists(key):
                subprocess.run([FERRYCTL, "keygen", "--out", key], check=True)
            dst_sock = os.path.join(work, "dst-in.sock")
            dq.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
            outs = {k: open(os.path.join(work, f"{k}.json"), "w+") for k in ("src", "dst")}
            serve = f"{host_b}:{port}"
            procs.append(proxy(ns_b, ["--serve", serve, "--forward", f"unix:{dst_sock}", "--compression", compress], key, outs["dst"], log))
            src_sock = os.path.join(work, "ferry.sock")
            procs.append(proxy(ns_a, ["--listen", f"unix:{src_sock}", "--to", serve, "--compression", compress], key, outs["src"], log))
            uri = f"unix:{src_sock}"
        else:
            uri = f"tcp:{host_b}:{port}"
            dq.cmd("migrate-incoming", uri=uri)
        settle = SETTLE_S - (time.time() - t_start)
        if settle > 0:
            time.sleep(settle)
        tx0 = veth_tx() if link else 0
        cpu0 = proc_cpu(sp.pid) + proc_cpu(dp.pid)
        t0 = time.time()
        sq.cmd("migrate", uri=uri)
        # The source's MIGRATION event ends it; the destination's RESUME is when the guest
        # runs there: total time is up to that event's timestamp.
        end = sq.wait_event("MIGRATION", lambda d: d.get("status") in ("completed", "failed", "cancelled"))
        if end["data"]["status"] != "completed":
            info = sq.cmd("query-migrate")
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
        resume = stamp(dq.wait_event("RESUME"))
        total = resume - t0
        # Both QEMU processes' CPU time from `migrate` until the destination runs (read
        # at once after RESUME; the idle guest's halted vCPU adds next to nothing).
        qemu_cpu = proc_cpu(sp.pid) + proc_cpu(dp.pid) - cpu0
        # QEMU's own figures; asked after RESUME because the source fills in total-time
        # only after it has announced completion.
        info = sq.cmd("query-migrate")
        stop = sq.event_time("STOP")
        wire = veth_tx() - tx0 if link else None
        if via_ferry:
            for p in procs[2:]:
                p.wait(timeout=60)
            for k, f in outs.items():
                f.seek(0)
                reports[k] = json.loads(f.read())
            if wire is None:
                wire = reports["src"]["wire_bytes"]
        return {"link": "1gbit" if link else "loopback", "mode": mode, "via": "ferry" if via_ferry else "qemu",
                "ferry_compress": compress if via_ferry else None, "total_s": round(total, 3),
                "qemu_total_ms": info.get("total-time"), "downtime_ms": round((resume - stop) * 1e3, 1) if stop and resume else None,
                "qemu_downtime_ms": info.get("downtime"), "transferred_bytes": info["ram"]["transferred"], "wire_bytes": wire,
                "qemu_cpu_s_per_gib": round(qemu_cpu / (size_mib / 1024), 3), "load": round(os.getloadavg()[0], 2)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()
        for p in (src_ram, dst_ram):
            if os.path.exists(p):
                os.unlink(p)


def proc_cpu(pid):
    """A process's user + system CPU seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def region_mode(size_mib, transport):
    r = subprocess.run([FERRYCTL, "bench", "migrate", "--size-mib", str(size_mib), "--dirty-rate-mbs", "0", "--transport", transport,
                        "--json"], capture_output=True, text=True, check=True)
    j = json.loads(r.stdout)
    return {"link": "loopback", "mode": "region", "via": f"ferry region mode ({transport})", "transport": j["source"]["transport"],
            "total_s": round(j["total_seconds"], 3), "downtime_ms": round(j["downtime_ms"], 1), "transferred_bytes": j["sent_bytes"],
            "wire_bytes": j["wire_bytes"], "rounds": len(j["rounds"]), "cpu_s_per_gib": round(j["cpu_seconds_per_gib"], 3),
            "load": round(os.getloadavg()[0], 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--links", default="loopback,1gbit")
    ap.add_argument("--region-only", action="store_true", help="loopback: only QEMU multifd-4 against region mode, interleaved")
    a = ap.parse_args()
    if not preflight():
        return
    src = corpus(a.size_mib)
    runs = {
        "loopback": [("default", False, None), ("multifd4", False, None), ("default", True, "off"), ("multifd4", True, "off")],
        "1gbit": [("default", False, None), ("multifd4-zstd", False, None), ("default", True, "zstd:1"), ("default", True, "auto"),
                  ("multifd4", True, "zstd:1")],
    }
    if a.region_only:
        runs["loopback"] = [("multifd4", False, None)]
        a.links = "loopback"
    results = []
    work = tempfile.mkdtemp(dir="/dev/shm", prefix="ferry-bq-")
    port = 7700
    try:
        for link in a.links.split(","):
            if link == "1gbit":
                setup_link(1000)
            for rep in range(a.reps):
                for mode, via, compress in runs[link]:
                    port += 1
                    r = one(work, a.size_mib, src, link == "1gbit", mode, via, compress, port)
                    r["rep"] = rep
                    print(json.dumps(r), flush=True)
                    results.append(r)
                if link == "loopback":
                    for transport in ("tcp", "sockets"):
                        r = region_mode(a.size_mib, transport)
                        r["rep"] = rep
                        print(json.dumps(r), flush=True)
                        results.append(r)
            if link == "1gbit":
                teardown_link()
    finally:
        teardown_link()
        shutil.rmtree(work, ignore_errors=True)

    def med(link, mode, via, compress=None, key="total_s"):
        xs = [r[key] for r in results if r["link"] == link and r["mode"] == mode and r["via"].startswith(via)
              and (compress is None or r.get("ferry_compress") == compress) and r.get(key) is not None]
        return median(xs) if xs else None
    summary = {}
    if "loopback" in a.links:
        q, qm = med("loopback", "default", "qemu"), med("loopback", "multifd4", "qemu")
        f, fm = med("loopback", "default", "ferry"), med("loopback", "multifd4", "ferry")
        qc = med("loopback", "multifd4", "qemu", key="qemu_cpu_s_per_gib")
        summary["loopback"] = {"qemu_default_s": q, "ferry_default_s": f, "extra_hop_default": f / q - 1 if q and f else None,
                               "qemu_multifd4_s": qm, "ferry_multifd4_s": fm, "extra_hop_multifd4": fm / qm - 1 if qm and fm else None,
                               "qemu_multifd4_cpu_s_per_gib": qc}
        for t in ("tcp", "sockets"):
            rg = med("loopback", "region", f"ferry region mode ({t})")
            rc = med("loopback", "region", f"ferry region mode ({t})", key="cpu_s_per_gib")
            summary["loopback"][f"region_{t}_s"] = rg
            summary["loopback"][f"region_{t}_vs_qemu_multifd4"] = rg / qm if qm and rg else None
            summary["loopback"][f"region_{t}_cpu_s_per_gib"] = rc
            summary["loopback"][f"region_{t}_cpu_vs_qemu_multifd4"] = rc / qc if qc and rc else None
    if "1gbit" in a.links:
        q, qz = med("1gbit", "default", "qemu"), med("1gbit", "multifd4-zstd", "qemu")
        summary["1gbit"] = {"qemu_default_s": q, "qemu_multifd4_zstd_s": qz}
        for c in ("zstd:1", "auto"):
            f = med("1gbit", "default", "ferry", c)
            summary["1gbit"][f"ferry_default_{c}_s"] = f
            summary["1gbit"][f"ferry_default_{c}_vs_qemu_default"] = f / q if f and q else None
            summary["1gbit"][f"ferry_default_{c}_vs_qemu_multifd4_zstd"] = f / qz if f and qz else None
        fm = med("1gbit", "multifd4", "ferry", "zstd:1")
        summary["1gbit"]["ferry_multifd4_zstd:1_s"] = fm
        summary["1gbit"]["ferry_multifd4_vs_qemu_default"] = fm / q if fm and q else None
    print(json.dumps({"summary": summary, "size_mib": a.size_mib, "reps": a.reps, "accel": accel()}, indent=1))


if __name__ == "__main__":
    main()
