#!/usr/bin/env bash
# Builds the ferry .deb: release binaries, manual pages and shell completions (generated
# from the same clap definitions as --help), then cargo-deb (metadata in
# control/Cargo.toml). Prints the package's path.
#   scripts/package.sh   ->  target/debian/ferry_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."
# dpkg-shlibdeps (dpkg-dev) works out the shared-library dependencies ("$auto").
if ! command -v dpkg-shlibdeps >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
fi
command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb
cargo build --release --quiet -p control -p dataplane --bins
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
target/release/ferryctl manpages "$assets/man"
target/release/ferryctl completions bash > "$assets/completions/ferryctl.bash"
target/release/ferryctl completions zsh > "$assets/completions/_ferryctl"
target/release/ferryctl completions fish > "$assets/completions/ferryctl.fish"
# Stripped: the binaries carry line tables (profile.release) that a package need not.
cargo deb -p control --no-build --strip --quiet 2>&1 | tail -1
