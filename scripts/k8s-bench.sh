#!/bin/bash
# Benchmark (not a test) on the lab's real 3-node cluster: weft against the reference CNI plugins
# (bridge + host-local + portmap, installed by hand as tests/k8s/smoke.sh does), each on a fresh lab:
#   ready   time from `kubectl apply -f manifests/` (weft) / writing the conflists (bridge) to all
#           nodes Ready
#   pods    a Deployment of 30 pods: time from `kubectl apply` to all 30 Running, and per pod
#           creationTimestamp -> container started (median, max)
# Prints one line per figure; docs/benchmarks.md records them. Needs what tests/k8s/weft.sh needs.
#   sudo scripts/k8s-bench.sh [ROUNDS]     (default 1 round of each; BENCH_CNIS="weft bridge" picks)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAB=$ROOT/scripts/k8s-lab.sh
NODES=3
PODS=30
ROUNDS=${1:-1}
NS=bench

now() { date +%s.%N; }
since() { python3 -c "print('%.1f' % ($(now) - $1))"; }
die() { echo "k8s-bench: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
ip netns list | grep -q '^wk8s-' && die "the lab is in use (netns wk8s-*); run this on a free lab"
trap '"$LAB" down >/dev/null 2>&1' EXIT

"$ROOT/scripts/image.sh" >&2

ready_all() { [ "$(kubectl get nodes -o jsonpath='{.items[*].status.conditions[?(@.type=="Ready")].status}')" = "True True True" ]; }

poll() { # SECONDS CMD...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || die "timed out: $*"; sleep 0.2; done
}

install_bridge() {
  local i cidr
  for i in $(seq 1 $NODES); do
    poll 60 sh -c "[ -n \"\$(kubectl get node wk8s-n$i -o jsonpath='{.spec.podCIDR}')\" ]"
  done
  T0=$(now)
  for i in $(seq 1 $NODES); do
    cidr=$(kubectl get node wk8s-n$i -o jsonpath='{.spec.podCIDR}')
    "$LAB" exec wk8s-n$i sh -c 'cp /usr/lib/cni/bridge /usr/lib/cni/host-local /opt/cni/bin/'
    "$LAB" exec wk8s-n$i sh -c "cat > /etc/cni/net.d/10-bridge.conflist" <<EOF
{ "cniVersion": "1.0.0", "name": "bench", "plugins": [
  { "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$cidr" }]], "routes": [{ "dst": "0.0.0.0/0" }] } },
  { "type": "portmap", "capabilities": { "portMappings": true } } ] }
EOF
  done
}

install_weft() {
  T0=$(now)
  kubectl apply -f "$ROOT/manifests/" >/dev/null
}

running() { [ "$(kubectl -n $NS get pods --field-selector=status.phase=Running -o name | wc -l)" = $PODS ]; }

pods_run() { # CNI
  kubectl create namespace $NS >/dev/null
  local t0; t0=$(now)
  kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: bench, namespace: $NS}
spec:
  replicas: $PODS
  selector: {matchLabels: {app: bench}}
  template:
    metadata: {labels: {app: bench}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: c, image: localhost/weft-test:latest, imagePullPolicy: Never, command: ["sleep", "3600"]}
EOF
  poll 300 running
  local total; total=$(since "$t0")
  local per
  per=$(kubectl -n $NS get pods -o json | python3 -c "
import json, sys, datetime, statistics
p = lambda s: datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))
d = sorted((p(i['status']['containerStatuses'][0]['state']['running']['startedAt']) - p(i['metadata']['creationTimestamp'])).total_seconds()
           for i in json.load(sys.stdin)['items'])
print('median %.1f s, max %.1f s' % (statistics.median(d), d[-1]))")
  echo "$1: $PODS pods apply -> all Running: $total s; per pod created -> started: $per"
  kubectl delete namespace $NS --wait=true >/dev/null
}

for r in $(seq 1 "$ROUNDS"); do
  for cni in ${BENCH_CNIS:-weft bridge}; do
    "$LAB" down >/dev/null 2>&1 || true
    "$LAB" up --nodes $NODES >/dev/null 2>&1 || die "lab up failed"
    eval "$("$LAB" env)"
    install_$cni
    poll 300 ready_all
    echo "$cni: install -> all $NODES nodes Ready: $(since "$T0") s"
    pods_run $cni
  done
done
