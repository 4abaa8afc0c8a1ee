#!/bin/bash
# The cluster of the NetworkPolicy conformance test (tests/tests/netpol.rs), set up the way the
# journey does it (tests/k8s/weft.sh, whose functions this sources):
#
#   tests/k8s/netpol-lab.sh up     waits while someone else's lab runs; builds the weft image
#                                  (scripts/image.sh) and the probe image localhost/weft-netprobe
#                                  (NETPROBE_BIN, with the libraries it links), brings up a
#                                  3-node lab that imports both, `kubectl apply -f manifests/`,
#                                  waits for every node Ready and the mesh complete
#   tests/k8s/netpol-lab.sh down   the lab down, as the journey leaves it
#
# Binaries: WEFT_BIN_DIR (else ${CARGO_TARGET_DIR:-target}/release) for weft and weft-cni;
# NETPROBE_BIN for the probe (default: weft-netprobe in that directory).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/k8s/weft.sh
. "$HERE/weft.sh"
PROBE_IMAGE=localhost/weft-netprobe:latest

probe_image() {
  local bin=${NETPROBE_BIN:-${WEFT_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}/weft-netprobe}
  [ -x "$bin" ] || fail "no probe binary at $bin (cargo build --release -p weft-e2e --bins)"
  local r libs l
  r=$(mktemp -d)
  mkdir -p "$r"/{etc,proc,sys,dev,tmp}
  cp "$bin" "$r/weft-netprobe"
  libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
  for l in $libs; do
    mkdir -p "$r$(dirname "$l")"
    cp -L "$l" "$r$l"
  done
  echo 'root:x:0:0:root:/:/weft-netprobe' > "$r/etc/passwd"
  mkdir -p "$ROOT/target/images"
  python3 "$ROOT/tests/k8s/mkimage.py" "$r" $PROBE_IMAGE "$ROOT/target/images/weft-netprobe.tar" \
    --entrypoint /weft-netprobe --cmd serve >/dev/null
  rm -rf "$r"
  echo "    probe image $PROBE_IMAGE: $(du -k "$ROOT/target/images/weft-netprobe.tar" | cut -f1) KiB"
}

netpol_up() {
  [ "$(id -u)" = 0 ] || fail "run as root"
  local end=$(( $(date +%s) + ${WEFT_LAB_WAIT:-600} )) waited=
  while ip netns list | grep -q '^wk8s-'; do
    [ "$(date +%s)" -lt "$end" ] || fail "the lab (netns wk8s-*) is in use; '$LAB down' if it is stale"
    [ -n "$waited" ] || { echo "the lab is in use (netns wk8s-*): waiting up to ${WEFT_LAB_WAIT:-600} s"; waited=1; }
    sleep 5
  done
  [ ! -e "$D" ] || "$LAB" down >/dev/null 2>&1 || true
  step "images"
  "$ROOT/scripts/image.sh"
  probe_image
  step "lab up ($NODES nodes)"
  "$LAB" up --nodes $NODES
  eval "$("$LAB" env)"
  [ "$(kubectl get nodes -o name | wc -l)" = $NODES ] || fail "expected $NODES nodes"
  step "kubectl apply -f manifests/"
  local t0; t0=$(date +%s)
  kubectl apply -f "$ROOT/manifests/"
  wait_weft netpol "$t0"
}

case ${1:-} in
  up) netpol_up ;;
  down) "$LAB" down ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
