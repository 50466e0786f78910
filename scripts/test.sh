#!/usr/bin/env bash
# Sets up and runs every test: lints (clippy, with undocumented unsafe blocks denied),
# unit and integration tests, and the Soft-RoCE guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
