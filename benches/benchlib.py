"""What the benchmark scripts share: the preflight, running commands, the guest-memory
corpus, and a link between two network namespaces shaped with tc tbf."""
import json, os, shutil, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FERRYCTL = os.path.join(ROOT, "target", "release", "ferryctl")


def preflight():
    """Root (for namespaces and tc) and a release build. Without root, prints a skip line
    and returns False."""
    if os.geteuid() != 0:
        print(json.dumps({"skip": "needs root for network namespaces and tc"}))
        return False
    if not os.path.exists(FERRYCTL):
        raise SystemExit(f"{FERRYCTL} missing: cargo build --release")
    return True


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def corpus(size_mib, shm=False):
    """The 1 GiB (or size_mib) corpus from ../shared/tools/peers/gen_corpus.py, generated
    once into $BENCH_DATA; with shm, a copy in /dev/shm so no disk is read."""
    data = os.environ.get("BENCH_DATA", "/var/tmp/ferry-bench")
    os.makedirs(data, exist_ok=True)
    src = os.path.join(data, f"corpus-{size_mib}.img")
    if not os.path.exists(src):
        gen = os.path.join(ROOT, "..", "shared", "tools", "peers", "gen_corpus.py")
        subprocess.run([sys.executable, gen, src, "--size-mib", str(size_mib)], check=True, stdout=subprocess.DEVNULL)
    if not shm:
        return src
    copy = f"/dev/shm/ferry-bench-src-{size_mib}.img"
    if not os.path.exists(copy):
        shutil.copy(src, copy)
    return copy


def setup_link(ns, devs, ips, mbit, latency, both_ends):
    """Two namespaces joined by a veth pair; tbf at mbit on the first end, or on both."""
    teardown_link(ns)
    for n in ns:
        sh("ip", "netns", "add", n)
    sh("ip", "link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
    for n, dev, ip in zip(ns, devs, ips):
        sh("ip", "link", "set", dev, "netns", n)
        sh("ip", "-n", n, "addr", "add", ip + "/24", "dev", dev)
        sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")
    for n, dev in list(zip(ns, devs))[: 2 if both_ends else 1]:
        sh("tc", "-n", n, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", latency)


def teardown_link(ns):
    for n in ns:
        sh("ip", "netns", "del", n, check=False)
