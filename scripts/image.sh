#!/bin/sh
# Builds the weft image without a container engine and without pulling anything: the `weft` and
# `weft-cni` binaries cargo built here (stripped), the shared libraries they link (as `ldd` lists
# them, at the same paths, with the dynamic loader), and the portmap CNI plugin, packed by
# tests/k8s/mkimage.py into one archive that is both an OCI layout (`ctr images import`) and a
# docker-archive (`docker load`, `podman load`). The same image as images/weft/Containerfile.
#
#   scripts/image.sh [--build]     --build: run `cargo build --release --locked` first (under the
#                                  shared build lock)
#
# Binaries: $WEFT_BIN_DIR, else ${CARGO_TARGET_DIR:-target}/release. Output: target/images/weft.tar
# (where scripts/k8s-lab.sh picks up images), named ghcr.io/weft-net/weft:<workspace version>, the
# chart's default image. Prints the archive's path and size.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VERSION=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && $1 ~ /^version *= */ { print $2; exit }' Cargo.toml)
IMAGE=${WEFT_IMAGE:-ghcr.io/weft-net/weft:$VERSION}
OUT=$ROOT/target/images/weft.tar
PORTMAP=${WEFT_PORTMAP:-/usr/lib/cni/portmap}

die() { echo "image: error: $*" >&2; exit 1; }

if [ "${1:-}" = "--build" ]; then
  flock "${WEFT_BUILD_LOCK:-/tmp/weft-build.lock}" cargo build --release --locked -p weft -p weft-cni
fi
BIN=${WEFT_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
for b in weft weft-cni; do
  [ -x "$BIN/$b" ] || die "no $BIN/$b: build first (scripts/image.sh --build, or set WEFT_BIN_DIR)"
done
[ -x "$PORTMAP" ] || die "no portmap plugin at $PORTMAP (apt-get install containernetworking-plugins)"
command -v strip >/dev/null || die "strip (binutils) is needed"

R=$(mktemp -d)
trap 'rm -rf "$R"' EXIT
mkdir -p "$R/usr/local/bin" "$R/usr/local/lib/weft/cni" "$R/etc" "$R/tmp" "$R/proc" "$R/sys" "$R/dev" \
  "$R/run" "$R/var/lib/weft"
chmod 1777 "$R/tmp"
# runtimes give pods' network namespaces as /var/run/netns/...: /var/run is /run, as on the node
mkdir -p "$R/var"
ln -s ../run "$R/var/run"
for b in weft weft-cni; do
  strip -o "$R/usr/local/bin/$b" "$BIN/$b"
done
cp "$PORTMAP" "$R/usr/local/lib/weft/cni/portmap"
# the libraries the binaries link (glibc, libgcc_s, ...) and the loader, at their own paths
libs=$(ldd "$BIN/weft" "$BIN/weft-cni" | awk '$1 ~ /:$/ { next } $2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
for l in $libs; do
  mkdir -p "$R$(dirname "$l")"
  cp -L "$l" "$R$l"
done
# /lib64 -> /usr/lib64 style merged-/usr links are not needed: ldd gives the paths the binaries use
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
echo 'hosts: files dns' > "$R/etc/nsswitch.conf"

mkdir -p "$(dirname "$OUT")"
python3 tests/k8s/mkimage.py "$R" "$IMAGE" "$OUT" --entrypoint /usr/local/bin/weft --cmd agent >/dev/null
echo "image: $IMAGE -> $OUT ($(du -k "$OUT" | cut -f1) KiB; files: $(du -sk "$R" | cut -f1) KiB:" \
  "$(for f in usr/local/bin/weft usr/local/bin/weft-cni usr/local/lib/weft/cni/portmap; do
       printf '%s %s KiB, ' "${f##*/}" "$(du -k "$R/$f" | cut -f1)"; done)libs $(echo $libs | wc -w))"
