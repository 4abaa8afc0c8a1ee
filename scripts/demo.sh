#!/bin/sh
# weft demo, self-contained in network namespaces: "hosts" each run a weft agent, "pods" are
# namespaces set up through the real weft-cni plugin. The pods ping each other, and
# `weft status` and `weft ps` show what the agents see. Everything is removed at the end
# (pass --keep to leave it running for a look around). Run as root:   ./scripts/demo.sh
set -eu
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_packages $DEMO_PACKAGES
need_rust
KEEP=${1:-}
P=wdemo
HOSTS=${HOSTS:-1}
PODS=${PODS:-3}
RUN=/run/$P

echo "==> building weft (release)"
cargo build --locked --release --quiet -p weft -p weft-cni
BIN=$(pwd)/target/release

cleanup() {
  for h in $(seq 1 "$HOSTS"); do
    [ -S "$RUN/h$h/weft.sock" ] && ip netns exec "$P-h$h" "$BIN/weft" --socket "$RUN/h$h/weft.sock" stop --state-dir "$RUN/h$h/state" >/dev/null 2>&1 || true
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
  rm -rf "$RUN"
}
cleanup
[ "$KEEP" = "--keep" ] || trap cleanup EXIT

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
cni() { # cni COMMAND HOST POD
  printf '{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","socket":"%s"}' "$RUN/h$2/weft.sock" |
    CNI_COMMAND=$1 CNI_CONTAINERID="pod-$2-$3" CNI_NETNS="/run/netns/$P-h$2-p$3" CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
    "$BIN/weft-cni"
}
weft() { h=$1; shift; ip netns exec "$P-h$h" "$BIN/weft" --socket "$RUN/h$h/weft.sock" "$@"; }

for h in $(seq 1 "$HOSTS"); do
  say "host h$h: starting the weft agent"
  ip netns add "$P-h$h"; ip -n "$P-h$h" link set lo up
  mkdir -p "$RUN/h$h"
  weft "$h" launch --state-dir "$RUN/h$h/state" --nickname "h$h" >/dev/null
  for p in $(seq 1 "$PODS"); do
    ip netns add "$P-h$h-p$p"
    addr=$(cni ADD "$h" "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"])')
    echo "   pod p$p on h$h: $addr"
    echo "$addr" > "$RUN/h$h/p$p.addr"
  done
done

say "every pod pings every other pod"
fail=0
for h in $(seq 1 "$HOSTS"); do for p in $(seq 1 "$PODS"); do
  for h2 in $(seq 1 "$HOSTS"); do for p2 in $(seq 1 "$PODS"); do
    [ "$h$p" = "$h2$p2" ] && continue
    dst=$(cut -d/ -f1 "$RUN/h$h2/p$p2.addr")
    if ip netns exec "$P-h$h-p$p" ping -c1 -W2 "$dst" >/dev/null; then r=ok; else r=FAILED; fail=1; fi
    echo "   h$h/p$p -> h$h2/p$p2 ($dst): $r"
  done; done
done; done

for h in $(seq 1 "$HOSTS"); do
  say "weft status on h$h"; weft "$h" status
  say "weft ps on h$h"; weft "$h" ps
done
[ "$KEEP" = "--keep" ] && echo "left running; remove with: $0 (it cleans up first)"
exit $fail
