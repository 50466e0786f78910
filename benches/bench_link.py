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
import argparse, json, os, shutil, subprocess, tempfile
from statistics import median

from benchlib import FERRYCTL, corpus as _corpus, preflight, setup_link, sh, teardown_link

NS_A, NS_B, IP_A, IP_B = "ferry-bench-a", "ferry-bench-b", "10.77.0.1", "10.77.0.2"
NS, DEVS, IPS = (NS_A, NS_B), ("fbench-a", "fbench-b"), (IP_A, IP_B)


def setup(mbit):
    # Shape the data direction. burst: enough for one 64 KiB chunk at line rate.
    setup_link(NS, DEVS, IPS, mbit, "50ms", both_ends=False)


def teardown():
    teardown_link(NS)


def corpus(size_mib):
    return _corpus(size_mib, shm=True)


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
    s = subprocess.run(["ip", "netns", "exec", NS_A, FERRYCTL, "send", "--embedded", "--json", "--compression", compress,
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
    if not preflight():
        return
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
