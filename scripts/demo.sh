#!/bin/sh
# weft demo, self-contained in network namespaces: three "hosts" on a shared underlay each run
# a weft agent; the agents form the mesh and share the IP range; "pods" are namespaces set up
# through the real weft-cni plugin and named in weave.local DNS. Every pod pings every other
# pod across the hosts, by address and by name (resolved by its host's agent), and
# `weft status`, `status ipam`, `status dns` and `weft ps` show what the agents see. Everything is
# removed at the end (pass --keep to leave it running for a look around).
# Run as root:   ./scripts/demo.sh        (HOSTS=N PODS=M change the sizes)
set -eu
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_packages $DEMO_PACKAGES
need_rust
KEEP=${1:-}
P=wdemo
HOSTS=${HOSTS:-3}
PODS=${PODS:-2}
RUN=/run/$P

echo "==> building weft (release)"
cargo build --locked --release --quiet -p weft -p weft-cni
BIN=$(pwd)/target/release

cleanup() {
  for h in $(seq 1 "$HOSTS"); do
    [ -S "$RUN/h$h/weft.sock" ] && ip netns exec "$P-h$h" "$BIN/weft" --socket "$RUN/h$h/weft.sock" stop --state-dir "$RUN/h$h/state" >/dev/null 2>&1 || true
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
  rm -rf "$RUN" /etc/netns/$P-*
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

say "underlay: $HOSTS hosts on one bridge (10.99.0.0/24)"
ip netns add "$P-ul"; ip -n "$P-ul" link set lo up
ip -n "$P-ul" link add br0 type bridge; ip -n "$P-ul" link set br0 up
for h in $(seq 1 "$HOSTS"); do
  ip netns add "$P-h$h"; ip -n "$P-h$h" link set lo up
  ip link add eth0 netns "$P-h$h" type veth peer name "h$h" netns "$P-ul"
  ip -n "$P-ul" link set "h$h" master br0 up
  ip -n "$P-h$h" addr add "10.99.0.$h/24" dev eth0; ip -n "$P-h$h" link set eth0 up
  echo "   h$h: 10.99.0.$h"
done

for h in $(seq 1 "$HOSTS"); do
  say "host h$h: starting the weft agent (peers: the other hosts)"
  mkdir -p "$RUN/h$h"
  peers=$(for o in $(seq 1 "$HOSTS"); do [ "$o" = "$h" ] || printf '10.99.0.%s ' "$o"; done)
  # shellcheck disable=SC2086
  weft "$h" launch --state-dir "$RUN/h$h/state" --nickname "h$h" $peers >/dev/null
done

for h in $(seq 1 "$HOSTS"); do
  for p in $(seq 1 "$PODS"); do
    ip netns add "$P-h$h-p$p"
    addr=$(cni ADD "$h" "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"])')
    echo "   pod p$p on h$h: $addr"
    echo "$addr" > "$RUN/h$h/p$p.addr"
  done
done

say "DNS: each host exposes itself on the weft network; its agent answers weave.local there"
for h in $(seq 1 "$HOSTS"); do
  dns=$(weft "$h" expose | cut -d/ -f1)
  echo "   h$h: DNS on $dns"
  for p in $(seq 1 "$PODS"); do
    # What a container runtime would write into the pod's resolv.conf.
    mkdir -p "/etc/netns/$P-h$h-p$p"
    printf 'nameserver %s\nsearch weave.local\noptions ndots:1\n' "$dns" > "/etc/netns/$P-h$h-p$p/resolv.conf"
    weft "$h" dns-add "/run/netns/$P-h$h-p$p" -h "h$h-p$p" | sed 's/^/   registered /'
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

say "every pod resolves every other pod's name (h<host>-p<pod>) and pings it by name"
for h in $(seq 1 "$HOSTS"); do for p in $(seq 1 "$PODS"); do
  for h2 in $(seq 1 "$HOSTS"); do for p2 in $(seq 1 "$PODS"); do
    [ "$h$p" = "$h2$p2" ] && continue
    name="h$h2-p$p2"
    want=$(cut -d/ -f1 "$RUN/h$h2/p$p2.addr")
    got=$(ip netns exec "$P-h$h-p$p" getent hosts "$name" | awk '{print $1}' || true)
    if [ "$got" = "$want" ] && ip netns exec "$P-h$h-p$p" ping -c1 -W2 "$name" >/dev/null; then r=ok; else r=FAILED; fail=1; fi
    echo "   h$h/p$p: $name -> ${got:-nothing}: $r"
  done; done
done; done

say "weft status on h1"; weft 1 status
say "weft status connections on h1"; weft 1 status connections
say "weft status ipam on h1 (the range, shared by the hosts)"; weft 1 status ipam
say "weft status dns on h2 (the names of every host)"; weft 2 status dns
for h in $(seq 1 "$HOSTS"); do
  say "weft ps on h$h"; weft "$h" ps
done
[ "$KEEP" = "--keep" ] && echo "left running; remove with: $0 (it cleans up first)"
exit $fail
