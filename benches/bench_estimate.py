#!/usr/bin/env python3
"""The pause advice's accuracy: `ferryctl demo` (region mode between two local ferryd)
over guest sizes, dirtying patterns and verification modes; for each run the last
pre-pause round's downtime estimate against the downtime ferry measured for the
stop-and-copy round (`ferry_downtime_ms`, ferry's own view), and their ratio. Each case
runs `--per-ferryd` migrations through one pair of ferryd (`demo --runs`): the first with
what a fresh ferryd assumes, the next with what it learned from the ones before (the end
of the last round, the paused digest's speed). Prints one JSON object per migration, then
the spread of the ratios, fresh and learned apart. Needs a release build.

    cargo build --release && benches/bench_estimate.py [--runs N] [--per-ferryd N] [--sizes 128,1024]
"""
import argparse, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
FERRYCTL = os.path.join(os.path.dirname(HERE), "target", "release", "ferryctl")


def run(size, pattern, verify, per_ferryd):
    out = subprocess.run(
        [FERRYCTL, "demo", "--size-mib", str(size), "--pattern", pattern, "--verify", verify,
         "--runs", str(per_ferryd), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    for n, line in enumerate(out.splitlines()):
        r = json.loads(line)
        pre = [x for x in r["rounds"] if not x.get("last")]
        est = pre[-1].get("estimated_downtime_ms") if pre else None
        last = [x for x in r["rounds"] if x.get("last")]
        measured = r["ferry_downtime_ms"]
        yield {
            "size_mib": size, "pattern": pattern, "verify": verify, "ferryd_run": n + 1,
            "rounds": len(r["rounds"]), "estimated_ms": est, "ferry_downtime_ms": measured,
            "ratio": est / measured if est and measured else None,
            "last_round": {k: last[0].get(k) for k in ("dirty_pages", "data_seconds", "confirm_seconds", "verdict_seconds")} if last else None,
        }


def spread(ratios):
    if not ratios:
        return None
    return {"runs": len(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "within_1_25x": sum(1 for x in ratios if 0.8 <= x <= 1.25)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--per-ferryd", type=int, default=3)
    ap.add_argument("--sizes", default="128,1024")
    ap.add_argument("--patterns", default="uniform,hot,sequential")
    ap.add_argument("--verify", default="sent,full")
    a = ap.parse_args()
    if not os.path.exists(FERRYCTL):
        sys.exit(f"{FERRYCTL} missing: cargo build --release")
    fresh, learned = [], []
    for _ in range(a.runs):
        for size in map(int, a.sizes.split(",")):
            for pattern in a.patterns.split(","):
                for verify in a.verify.split(","):
                    for res in run(size, pattern, verify, a.per_ferryd):
                        print(json.dumps(res), flush=True)
                        if res["ratio"]:
                            (fresh if res["ferryd_run"] == 1 else learned).append(res["ratio"])
    print(json.dumps({"fresh_ferryd": spread(fresh), "learned": spread(learned)}))


if __name__ == "__main__":
    main()
