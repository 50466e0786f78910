#!/usr/bin/env bash
# Installs what ferry needs on Debian 12 (idempotent, non-interactive).
#   scripts/setup.sh          build and runtime packages (rdma-core, hwloc, libclang for bindgen)
#   scripts/setup.sh --test   also QEMU, a kernel and perftest for the Soft-RoCE test guest,
#                             builds the guest image (../shared/tools/rxe-vm), installs
#                             cargo-fuzz and cargo-deb, promtool, the packaging tools,
#                             libvirt, and builds Cloud Hypervisor (../shared/tools)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# ../shared/CRATES.md lists what the chosen crates need to build; runtime hosts need
# libibverbs1, ibverbs-providers, libhwloc15 and libudev1.
pkgs=(pkg-config gcc cmake libclang-dev libibverbs-dev ibverbs-providers libnl-3-dev libnl-route-3-dev
      libhwloc-dev libudev-dev)
# What ../shared/tools/rxe-vm/build-initramfs.sh puts into the guest, plus iproute2.
test_pkgs=(qemu-system-x86 linux-image-amd64 busybox-static rdma-core ibverbs-utils perftest iproute2 kmod cpio)
# promtool (package prometheus) lints the metrics and tests the alert rules; the deploy
# checks (scripts/check-deploy.sh) build the .deb (dpkg-dev), an image (mmdebstrap,
# podman, runc) and validate the Kubernetes tree (python3-yaml, python3-venv).
test_pkgs+=(prometheus dpkg-dev mmdebstrap podman runc python3-yaml python3-venv curl)
# The libvirt test (control/tests/libvirt.rs): two session-mode libvirtd and virsh.
test_pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
[ $want_test = 1 ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

if [ $want_test = 1 ]; then
  # The frame decoder's fuzz target (fuzz/). cargo-fuzz comes from crates.io.
  command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
  # The .deb (scripts/package.sh).
  command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb
  shared=${FERRY_SHARED_DIR:-$here/../shared}
  build=${RXE_VM_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/rxe-vm}
  if [ ! -x "$shared/tools/rxe-vm/build-initramfs.sh" ]; then
    echo "setup: $shared/tools/rxe-vm not found: the Soft-RoCE guest test will SKIP (set FERRY_SHARED_DIR)" >&2
  elif [ ! -s "$build/rxe-initramfs.cpio.gz" ] || [ "$(cat "$build/kver" 2>/dev/null)" != "$(ls -1 /lib/modules | grep -- '-amd64$' | sort -V | tail -1)" ]; then
    echo "setup: building the Soft-RoCE guest image in $build"
    "$shared/tools/rxe-vm/build-initramfs.sh" >/dev/null
  fi
  # Cloud Hypervisor and its tiny guest, for control/tests/cloud_hypervisor.rs (about 4
  # minutes the first time; cached in $CH_BUILD or ~/.cache/cloud-hypervisor).
  if [ -x "$shared/tools/cloud-hypervisor/build.sh" ]; then
    echo "setup: Cloud Hypervisor in $("$shared/tools/cloud-hypervisor/build.sh")"
  else
    echo "setup: $shared/tools/cloud-hypervisor not found: the Cloud Hypervisor test will SKIP" >&2
  fi
fi
echo "setup: ok"
