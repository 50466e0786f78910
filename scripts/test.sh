#!/usr/bin/env bash
# Sets up and runs every test: lints (clippy, with undocumented unsafe blocks denied),
# unit and integration tests, the Soft-RoCE guest tests, loom's models of the lock-free
# hand-offs and Miri on their unit tests, the fuzzers for a bounded time,
# and the deploy checks (package, units, Kubernetes, image). Ends with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# The lock-free hand-offs (page claims, claim bits, the window cursor) in every
# interleaving loom finds: only the lockfree crate builds under --cfg loom, in a target
# directory of its own (the workspace's would be rebuilt for the flag otherwise).
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" cargo test -p lockfree --release --test loom 2>&1 | tee -a "$log"
# Unit tests under Miri (undefined behaviour, out-of-bounds accesses and data races in
# what they run, the dependencies' unsafe code included); Miri is a nightly component,
# fetched here when missing.
if rustup component add --toolchain nightly miri rust-src >/dev/null 2>&1 \
  || rustup toolchain install nightly --profile minimal --component miri,rust-src >/dev/null 2>&1; then
  cargo +nightly miri test -p lockfree --lib 2>&1 | tee -a "$log"
  # The data plane's tests of what parses and seals peers' bytes (frame headers, the
  # session's layout, tags) and of the estimate: pure code, so Miri runs them.
  cargo +nightly miri test -p dataplane --lib -- wire:: seal:: estimate:: 2>&1 | tee -a "$log"
else
  echo "SKIP: miri: the nightly toolchain with its miri component cannot be installed here" | tee -a "$log"
fi
# The frame decoder and the control-socket request parser under libFuzzer, each for a
# bounded time. cargo fuzz needs nightly flags (sanitizers); only a stable toolchain is
# available here, so RUSTC_BOOTSTRAP lets stable accept them.
fuzz_secs=${FERRY_FUZZ_SECONDS:-60}
for target in frames control; do
  secs=$fuzz_secs
  [ "$target" = control ] && secs=$(( (fuzz_secs + 1) / 2 ))
  flog=$(mktemp)
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs" 2>&1) | tee "$flog" | grep -E "^(Done|INFO: Seed)|DONE|ERROR|SUMMARY|panicked" || true
  cat "$flog" >> "$log"
  grep -q "^Done [0-9]* runs" "$flog" || { echo "fuzz: the $target target did not finish cleanly" >&2; rm -f "$flog"; exit 1; }
  rm -f "$flog"
done
# The deploy artifacts with the real tools: the .deb installed, its unit verified, scored
# and run; the Kubernetes tree validated; the image built and run (scripts/check-deploy.sh).
scripts/check-deploy.sh 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "deploy checks failed" >&2; exit 1; }
# Tests that could not run here printed `SKIP: <reason>`; they count as skipped, not passed.
skips=$(grep -h '^SKIP:' "$log" | sort -u || true)
[ -n "$skips" ] && echo "$skips"
nskip=$(printf '%s' "$skips" | grep -c '^SKIP:' || true)
awk -v nskip="$nskip" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - nskip, f, s + nskip }' "$log"
