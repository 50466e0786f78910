#!/usr/bin/env bash
# The fault-injection suite: the hostile cases of issue 11 against the real binaries (a
# destination VMM that leaves, guest memory that shrinks or claims 256 TiB, port probes,
# wrong keys and tricklers, pre-authentication floods, oversized sessions, a file that
# shrinks while it is sent, descriptor floods, an on-path relay that rewrites a frame).
# `scripts/test.sh` runs them with everything else; this runs only them, e.g. against an
# older build to show that a case fails there:
#   FERRY_BIN_DIR=/path/to/old/target/debug scripts/faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
cargo test -p control --test faults_transfer --test faults_ferryd -- "$@"
