#!/usr/bin/env bash
# Builds ferry's container image from the .deb, with no registry: mmdebstrap makes a
# minimal Debian 12 root file system from Debian's mirror with the package installed
# (its dependencies from Debian), podman imports it as localhost/ferry:<version>, and the
# image is also saved as an OCI archive to load or push elsewhere.
#   scripts/build-image.sh [DEB]   ->  localhost/ferry:<version>, target/image/ferry-<version>.oci.tar
# Needs root (mmdebstrap chroots), mmdebstrap and podman (scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(ls -t target/debian/ferry_*.deb | head -1)}
version=$(dpkg-deb -f "$deb" Version | sed 's/-[^-]*$//')
out=target/image
mkdir -p "$out"
rootfs=$(mktemp --suffix=.tar)
trap 'rm -f "$rootfs"' EXIT
mmdebstrap --quiet --variant=minbase --include=ca-certificates \
  --customize-hook="copy-in $deb /tmp" \
  --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /tmp/$(basename "$deb") >/dev/null" \
  --customize-hook='rm -f "$1"/tmp/*.deb; rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  bookworm "$rootfs" http://deb.debian.org/debian
podman import --quiet \
  --change 'CMD ["/usr/bin/ferryd", "--help"]' \
  --change "LABEL org.opencontainers.image.title=ferry org.opencontainers.image.version=$version" \
  "$rootfs" "localhost/ferry:$version" >/dev/null
rm -f "$out/ferry-$version.oci.tar"
podman save --quiet --format oci-archive -o "$out/ferry-$version.oci.tar" "localhost/ferry:$version"
echo "localhost/ferry:$version"
