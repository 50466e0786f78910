#!/usr/bin/env python3
"""ferry over an emulated slow link: two network namespaces joined by a veth pair, the
sending side shaped with a token-bucket qdisc (tc tbf) to --mbit. Runs `ferryctl recv` in
one namespace and `ferryctl send` in the other for each compression policy (off, zstd:1,
auto), interleaved, and prints one JSON line per transfer and a summary: effective
throughput of the region as a multiple of the link rate.

    cargo build --release && sudo benches/bench_link.py [--mbit 1000] [--size-mib 1024] [--reps 2]

Needs root (namespaces, tc). Traffic stays inside the namespaces this script creates
(10.77.0.1 <-> 10.77.0.2) and they are deleted at the end.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FERRYCTL = os.path.join(ROOT, "target", "release", "ferryctl")
NS_A, NS_B, IP_A, IP_B = "ferry-bench-a", "ferry-bench-b", "10.77.0.1", "10.77.0.2"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup(mbit):
    teardown()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "fbench-a", "type", "veth", "peer", "name", "fbench-b")
    sh("ip", "link", "set", "fbench-a", "netns", NS_A)
    sh("ip", "link", "set", "fbench-b", "netns", NS_B)
    for ns, dev, ip in ((NS_A, "fbench-a", IP_A), (NS_B, "fbench-b", IP_B)):
        sh("ip", "-n", ns, "addr", "add", ip + "/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    # Shape the data direction. burst: enough for one 64 KiB chunk at line rate.
    sh("tc", "-n", NS_A, "qdisc", "add", "dev", "fbench-a", "root", "tbf",
       "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms")


def teardown():
    sh("ip", "netns", "del", NS_A, check=False)
    sh("ip", "netns", "del", NS_B, check=False)


def corpus(size_mib):
    data = os.environ.get("BENCH_DATA", "/var/tmp/ferry-bench")
    os.makedirs(data, exist_ok=True)
    src = os.path.join(data, f"corpus-{size_mib}.img")
    if not os.path.exists(src):
        gen = os.path.join(ROOT, "..", "shared", "tools", "peers", "gen_corpus.py")
        subprocess.run([sys.executable, gen, src, "--size-mib", str(size_mib)], check=True, stdout=subprocess.DEVNULL)
    shm = f"/dev/shm/ferry-bench-src-{size_mib}.img"
    if not os.path.exists(shm):
        shutil.copy(src, shm)
    return shm


def transfer(src, compress, port, work):
    key = os.path.join(work, "k")
    if not os.path.exists(key):
        subprocess.run([FERRYCTL, "keygen", "--out", key], check=True)
    out = os.path.join(work, "dst.img")
    recv = subprocess.Popen(["ip", "netns", "exec", NS_B, FERRYCTL, "recv", "--embedded", "--json", "--listen", f"{IP_B}:{port}",
                             "--key", key, "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RUST_LOG": "info"})
    # Send once the receiver says it listens.
    seen = []
    for line in recv.stderr:
        seen.append(line)
        if "listening on" in line:
            break
    else:
        raise SystemExit("ferryctl recv never listened: " + "".join(seen))
    s = subprocess.run(["ip", "netns", "exec", NS_A, FERRYCTL, "send", "--embedded", "--json", "--compress", compress,
                        "--to", f"{IP_B}:{port}", "--key", key, "--file", src], capture_output=True, text=True)
    r_out, r_err = recv.communicate(timeout=600)
    if s.returncode != 0 or recv.returncode != 0:
        raise SystemExit(f"transfer failed: send: {s.stderr}\nrecv: {r_err}")
    os.unlink(out)
    return json.loads(s.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"skip": "needs root for network namespaces and tc"}))
        return
    if not os.path.exists(FERRYCTL):
        raise SystemExit(f"{FERRYCTL} missing: cargo build --release")
    src = corpus(a.size_mib)
    link_gbps = a.mbit / 8000.0
    results = {}
    work = tempfile.mkdtemp(dir="/dev/shm")
    setup(a.mbit)
    try:
        port = 7600
        for rep in range(a.reps):
            for compress in ("off", "zstd:1", "auto"):
                port += 1
                r = transfer(src, compress, port, work)
                line = {"rep": rep, "compress": compress, "link_mbit": a.mbit, "gbps": r["gbps"], "seconds": r["seconds"],
                        "wire_bytes": r["wire_bytes"], "compressed_in_bytes": r["compressed_in_bytes"],
                        "compressed_out_bytes": r["compressed_out_bytes"], "zero_pages": r["zero_pages"],
                        "send_cpu_s_per_gib": r["cpu_seconds_per_gib"], "lanes": r["lanes"],
                        "times_link_rate": r["gbps"] / link_gbps, "load": os.getloadavg()[0]}
                print(json.dumps(line), flush=True)
                results.setdefault(compress, []).append(line)
    finally:
        teardown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"summary": f"{a.size_mib} MiB corpus over a {a.mbit} Mbit/s tbf link, medians",
                      **{c: {"seconds": median(x["seconds"] for x in v), "times_link_rate": median(x["times_link_rate"] for x in v)}
                         for c, v in results.items()}}))


if __name__ == "__main__":
    main()
