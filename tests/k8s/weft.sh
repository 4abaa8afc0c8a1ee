#!/bin/bash
# The Kubernetes journey (issue 15) on a real 3-node cluster of the lab (scripts/k8s-lab.sh):
#
#   manifests  `scripts/manifests.sh --check`: the chart lints and manifests/weft.yaml is its output
#   apply      `kubectl apply -f manifests/` on a cluster without a pod network: every node turns
#              Ready, the weft pods run and log a sane start; then the network checks below;
#              `kubectl delete -f manifests/` leaves the conflist and plugin on the nodes
#   helm       `helm install weft helm/weft` over that (a reinstall); the network checks again
#   upgrade    `helm upgrade` with a changed value rolls the DaemonSet one node at a time while a
#              TCP stream between pods on two nodes keeps flowing; every pod keeps its address
#   reclaim    wk8s-n3 (with pods) loses its kubelet, its agent and its link, then `kubectl delete
#              node`: exactly one surviving agent owns its address space within 30 s, new pods get
#              addresses, no two pods ever share one; wk8s-n3 then comes back as a new machine
#   uninstall  `helm uninstall`: conflist, plugin and state stay; a new pod waits in
#              ContainerCreating; `helm install` again and it runs
#
# network checks: a Deployment of 6 pods spread over the 3 nodes (2 each, kubelet readiness probes
# from each node): every pod reaches every other pod; a ClusterIP Service from a pod on every node;
# a pod reaching itself through a Service (hairpin); a NodePort from the lab host and from another
# node; a hostPort (portmap chained in weft's conflist) from the host and from another node.
#
# Needs root, the release binaries (${CARGO_TARGET_DIR:-target}/release or WEFT_BIN_DIR: the image
# is built from them by scripts/image.sh) and the lab's prerequisites (docs/testing.md).
# WEFT_JOURNEY="apply helm upgrade reclaim uninstall" selects phases (each needs the ones before
# it, except that helm runs alone too). WK8S_KEEP=1 keeps the lab after a failure.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LAB=$ROOT/scripts/k8s-lab.sh
D=${WK8S_DIR:-/var/lib/wk8s}
APP=weft-journey          # namespace of the test workloads
SYS=kube-system           # where weft is installed
NODES=3
RANGE=10.32.0.0/12        # the chart's default ipam.range
PHASES=${WEFT_JOURNEY:-apply helm upgrade reclaim uninstall}
START=$(date +%s)
SUMMARY=()

step() { echo "==> [$(( $(date +%s) - START ))s] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
want() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
figure() { SUMMARY+=("$*"); echo "    figure: $*"; }
node_ip() { echo "10.98.0.$((10 + ${1#wk8s-n}))"; }

# poll DESCRIPTION SECONDS CMD...: until CMD succeeds, or fail at the deadline
poll() {
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "last attempt of: $*" >&2; "$@" >&2 || true; fail "timed out after ${secs}s: $what"; }
    sleep 1
  done
}

dump() {
  echo "----- diagnostics -----"
  if command -v kubectl >/dev/null && [ -n "${KUBECONFIG:-}" ]; then
    kubectl get nodes -o wide || true
    kubectl get pods -A -o wide || true
    kubectl -n $SYS describe ds weft 2>/dev/null | tail -n 30 || true
    kubectl get events -A --sort-by=.lastTimestamp | tail -n 40 || true
    local p
    for p in $(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o name 2>/dev/null); do
      echo "----- logs $p"
      kubectl -n $SYS logs "$p" -c install-cni --tail=5 2>&1 | cut -c1-300 || true
      kubectl -n $SYS logs "$p" -c weft --tail=40 2>&1 | cut -c1-400 || true
      kubectl -n $SYS logs "$p" -c weft --previous --tail=20 2>/dev/null | cut -c1-400 || true
      kubectl -n $SYS exec "$p" -c weft -- weft status 2>&1 | head -n 30 || true
      kubectl -n $SYS exec "$p" -c weft -- weft status ipam 2>&1 | head -n 20 || true
    done
  fi
  local n
  for n in "$D"/n*; do
    [ -d "$n" ] || continue
    echo "----- ${n##*/}: /etc/cni/net.d, /opt/cni/bin"
    ls "$n/root/etc/cni/net.d" "$n/root/opt/cni/bin" 2>&1 | tr '\n' ' '; echo
    cat "$n"/root/etc/cni/net.d/*.conflist 2>/dev/null | head -c 1500; echo
  done
  local f
  for f in "$D"/cp/kube-controller-manager.log "$D"/n*/log/kubelet.log "$D"/n*/log/containerd.log; do
    [ -f "$f" ] || continue
    echo "----- tail $f"
    grep -iE 'weft|cni|error' "$f" | tail -n 12 | cut -c1-400
  done
}

finish() {
  local rc=$?
  set +e
  [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
  if [ $rc -ne 0 ]; then
    echo "FAIL (exit $rc) after $(( $(date +%s) - START ))s"
    dump
    if [ "${WK8S_KEEP:-0}" = 1 ]; then
      echo "WK8S_KEEP=1: lab left running; eval \"\$($LAB env)\"; $LAB down when done"
      exit $rc
    fi
  fi
  step "tearing down"
  "$LAB" down
  if ip netns list | grep -q '^wk8s-' || [ -e "$D" ]; then
    echo "FAIL: down left netns or $D behind"; rc=1
  fi
  if [ $rc -eq 0 ]; then
    local s; for s in "${SUMMARY[@]}"; do echo "    $s"; done
    echo "PASS: weft Kubernetes journey ($(( $(date +%s) - START ))s)"
  fi
  exit $rc
}

# ---------------------------------------------------------------------------------------------
# weft's own view, from the status listener on each node (hostNetwork, port 6782)

status_json() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$(node_ip "$1"):6782/status', timeout=5).read().decode())"; }

# the /status field at PYTHON-EXPRESSION over r (the report) of NODE
status_get() { # NODE EXPR
  status_json "$1" | python3 -c "import json,sys; r=json.load(sys.stdin); v=$2; print(v if isinstance(v,str) else json.dumps(v))"
}

# every agent has established connections to all the others
mesh_complete() { # NODE...
  local n want=$(( $# - 1 )) got
  for n in "$@"; do
    got=$(status_get "$n" "len([c for c in r['mesh']['connections'] if c.get('state') == 'established'])") || return 1
    [ "$got" = "$want" ] || return 1
  done
}

# the non-hostNetwork pods' addresses: "ns/name ip" lines
pod_ips() {
  kubectl get pods -A -o jsonpath='{range .items[?(@.status.podIP)]}{.metadata.namespace}/{.metadata.name} {.spec.hostNetwork} {.status.podIP}{"\n"}{end}' |
    awk '$2 != "true" { print $1, $3 }' | sort
}

# no two pods hold one address, and every pod address is in weft's range
no_duplicate_ips() {
  local ips dups
  ips=$(pod_ips)
  dups=$(echo "$ips" | awk 'NF == 2 { print $2 }' | sort | uniq -d)
  [ -z "$dups" ] || fail "pods sharing an address: $(echo "$ips" | grep -wF "$dups")"
  echo "$ips" | awk 'NF == 2 { print $2 }' | python3 -c "
import ipaddress, sys
r = ipaddress.ip_network('$RANGE')
bad = [l.strip() for l in sys.stdin if l.strip() and ipaddress.ip_address(l.strip()) not in r]
sys.exit('pod addresses outside $RANGE: %s' % bad if bad else 0)" || fail "pod address outside the range"
  echo "    $(echo "$ips" | grep -c . || true) pod addresses, all distinct, all in $RANGE"
}

# ---------------------------------------------------------------------------------------------
# install and wait

wait_weft() { # LABEL T0: nodes Ready, DaemonSet rolled out, logs sane, mesh complete
  local label=$1 t0=$2 nodes
  nodes=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {end}')
  kubectl wait --for=condition=Ready node --all --timeout=240s >/dev/null ||
    fail "$label: not every node turned Ready"
  figure "$label: kubectl/helm -> all $(echo $nodes | wc -w) nodes Ready: $(( $(date +%s) - t0 )) s"
  kubectl -n $SYS rollout status ds/weft --timeout=180s
  local n p log
  for n in $nodes; do
    p=$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft --field-selector spec.nodeName="$n" -o name)
    [ "$(echo "$p" | grep -c .)" = 1 ] || fail "$label: expected one weft pod on $n, got: $p"
    log=$(kubectl -n $SYS logs "$p" -c weft)
    echo "$log" | grep -q 'weft agent ready' || fail "$label: $p did not log 'weft agent ready': $(echo "$log" | tail -n 20)"
    ! echo "$log" | grep -qE 'panicked|ERROR' || fail "$label: $p logged an error: $(echo "$log" | grep -E 'panicked|ERROR' | head -n 5)"
    "$LAB" exec "$n" sh -c 'grep -q "\"weft\"" /etc/cni/net.d/10-weft.conflist && grep -q "\"portmap\"" /etc/cni/net.d/10-weft.conflist && [ -x /opt/cni/bin/weft-cni ]' ||
      fail "$label: $n has no weft conflist chaining portmap, or no /opt/cni/bin/weft-cni"
  done
  echo "    $(kubectl -n $SYS logs "$p" -c weft | grep -c .) log lines on ${p#pod/}; start:"
  kubectl -n $SYS logs "$p" -c weft | grep -E 'ready|peer|connection established|conflist|ring' | head -n 8 | cut -c1-220 | sed 's/^/      /'
  # shellcheck disable=SC2086
  poll "$label: every agent connected to every other" 60 mesh_complete $nodes
  figure "$label: mesh complete (every agent connected to all others): $(( $(date +%s) - t0 )) s after install"
}

# ---------------------------------------------------------------------------------------------
# the network checks

workloads() {
  kubectl create namespace $APP --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $APP}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}
      containers:
      - name: web
        image: localhost/weft-test:latest
        imagePullPolicy: Never
        command: ["httpd", "-f", "-p", "8080", "-h", "/var/www"]
        ports: [{containerPort: 8080}]
        # the kubelet probes each pod from its node: node -> pod over weft's bridge
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $APP}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: $APP}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: hairpin, namespace: $APP}
spec:
  selector: {app: web, hairpin: "yes"}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: hostport, namespace: $APP, labels: {app: hostport}}
spec:
  nodeName: wk8s-n2
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: localhost/weft-test:latest
    imagePullPolicy: Never
    command: ["httpd", "-f", "-p", "8080", "-h", "/var/www"]
    ports: [{containerPort: 8080, hostPort: 18080}]
EOF
}

fetch_ok() { # WHERE... URL: "pod NAME" | "node NODE" | "host"
  local url=${*: -1} out
  case $1 in
    pod) out=$(kubectl -n $APP exec "$2" -- timeout 5 wget -q -O - "$url") ;;
    node) out=$("$LAB" exec "$2" timeout 5 busybox wget -q -O - "$url") ;;
    host) out=$(timeout 5 busybox wget -q -O - "$url") ;;
  esac
  [ "$out" = weft-test ]
}

# every pod fetches every pod's page; prints the failures
mesh_failures() { # IPS
  local p
  for p in $(kubectl -n $APP get pods -l app=web -o name); do
    kubectl -n $APP exec "${p#pod/}" -- sh -c "for ip in $1; do
      o=\$(timeout 5 wget -q -O - http://\$ip:8080/ 2>&1); [ \"\$o\" = weft-test ] || echo \"${p#pod/} -> \$ip: \$o\"; done" 2>&1
  done
}

net_checks() { # LABEL
  local label=$1 t0 n
  t0=$(date +%s)
  workloads
  kubectl -n $APP rollout status deploy/web --timeout=180s
  kubectl -n $APP wait --for=condition=Ready pod/hostport --timeout=120s >/dev/null
  figure "$label: 6 spread pods + hostPort pod Ready: $(( $(date +%s) - t0 )) s"
  kubectl -n $APP get pods -o wide
  for n in $(kubectl get nodes -o name); do
    n=${n#node/}
    [ "$(kubectl -n $APP get pods -l app=web --field-selector spec.nodeName="$n" -o name | wc -l)" = 2 ] ||
      fail "$label: expected 2 web pods on $n"
  done
  no_duplicate_ips
  local ips
  ips=$(kubectl -n $APP get pods -l app=web -o jsonpath='{.items[*].status.podIP}')
  t0=$(date +%s)
  local left end=$(( $(date +%s) + 60 ))
  while left=$(mesh_failures "$ips"); [ -n "$left" ]; do
    [ "$(date +%s)" -lt "$end" ] || fail "$label: pods cannot reach each other:
$left"
    sleep 2
  done
  figure "$label: all 36 pod->pod fetches succeed ($(( $(date +%s) - t0 )) s to converge)"

  local svc pod
  svc=$(kubectl -n $APP get svc web -o jsonpath='{.spec.clusterIP}')
  for n in $(kubectl get nodes -o name); do
    pod=$(kubectl -n $APP get pods -l app=web --field-selector spec.nodeName="${n#node/}" -o jsonpath='{.items[0].metadata.name}')
    poll "$label: ClusterIP $svc from $pod on ${n#node/}" 60 fetch_ok pod "$pod" "http://$svc/"
  done
  echo "    ClusterIP $svc reachable from a pod on every node"
  pod=$(kubectl -n $APP get pods -l app=web -o jsonpath='{.items[0].metadata.name}')
  kubectl -n $APP label pod "$pod" hairpin=yes --overwrite >/dev/null
  svc=$(kubectl -n $APP get svc hairpin -o jsonpath='{.spec.clusterIP}')
  poll "$label: hairpin endpoint" 30 sh -c "kubectl -n $APP get endpointslices -l kubernetes.io/service-name=hairpin -o jsonpath='{.items[*].endpoints[*].addresses[*]}' | grep -q ."
  poll "$label: $pod reaching itself through Service $svc (hairpin)" 60 fetch_ok pod "$pod" "http://$svc/"
  echo "    hairpin: $pod reaches itself through $svc"

  for n in $(kubectl get nodes -o name); do
    poll "$label: NodePort ${n#node/}:30080 from the lab host" 60 fetch_ok host "http://$(node_ip "${n#node/}"):30080/"
  done
  poll "$label: NodePort wk8s-n2:30080 from wk8s-n1" 60 fetch_ok node wk8s-n1 "http://$(node_ip wk8s-n2):30080/"
  echo "    NodePort 30080 reachable from the underlay (host -> every node, wk8s-n1 -> wk8s-n2)"
  poll "$label: hostPort wk8s-n2:18080 from the lab host" 60 fetch_ok host "http://$(node_ip wk8s-n2):18080/"
  poll "$label: hostPort wk8s-n2:18080 from wk8s-n1" 60 fetch_ok node wk8s-n1 "http://$(node_ip wk8s-n2):18080/"
  echo "    hostPort 18080 on wk8s-n2 reachable from the host and from wk8s-n1 (portmap)"
}

clear_workloads() {
  kubectl delete namespace $APP --wait=true --timeout=120s >/dev/null 2>&1 || true
  poll "namespace $APP gone" 120 sh -c "! kubectl get namespace $APP"
}

# ---------------------------------------------------------------------------------------------
# phases

phase_apply() {
  step "apply: kubectl apply -f manifests/ on a cluster without a pod network"
  [ "$(kubectl get nodes -o jsonpath='{.items[*].status.conditions[?(@.type=="Ready")].status}')" = "False False False" ] ||
    fail "the nodes should be NotReady before weft is installed"
  local t0; t0=$(date +%s)
  kubectl apply -f "$ROOT/manifests/"
  wait_weft apply "$t0"
  net_checks apply
  clear_workloads
  step "apply: kubectl delete -f manifests/"
  kubectl delete -f "$ROOT/manifests/" --wait=true --timeout=120s
  poll "weft pods gone" 120 sh -c "[ -z \"\$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o name)\" ]"
  local n
  for n in $(kubectl get nodes -o name); do
    "$LAB" exec "${n#node/}" sh -c '[ -f /etc/cni/net.d/10-weft.conflist ] && [ -x /opt/cni/bin/weft-cni ] && [ -d /var/lib/weft ]' ||
      fail "after kubectl delete: ${n#node/} lost the conflist, weft-cni or /var/lib/weft (documented to stay)"
  done
  echo "    as documented: conflist, weft-cni and /var/lib/weft stay on every node"
}

# the map page of a weft pod at 127.0.0.1:16782, through the port-forward NOTES.txt tells of
map_page_forwarded() {
  python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:16782/', timeout=3).read().decode())" 2>/dev/null \
    | grep -q "<title>weft map</title>"
}

phase_helm() {
  step "helm: helm install weft helm/weft"
  local t0; t0=$(date +%s)
  helm install weft "$ROOT/helm/weft" --namespace $SYS
  wait_weft "helm install" "$t0"
  net_checks helm
  step "helm: the map page through kubectl port-forward, as the chart's notes say"
  local pod; pod=$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o jsonpath='{.items[0].metadata.name}')
  kubectl -n $SYS port-forward "pod/$pod" 16782:6782 >/dev/null 2>&1 &
  local pf=$!
  poll "the map page of $pod through kubectl port-forward" 30 map_page_forwarded
  kill $pf 2>/dev/null || true
  wait $pf 2>/dev/null || true
}

# the pods' addresses now equal those in FILE ("ns/name ip" lines)
same_ips() { diff <(pod_ips | grep "^$APP/") <(grep "^$APP/" "$1"); }

phase_upgrade() {
  step "upgrade: a TCP stream between pods on wk8s-n1 and wk8s-n2"
  kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: stream-server, namespace: $APP}
spec:
  nodeName: wk8s-n2
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft-test:latest
    imagePullPolicy: Never
    # busybox nc ends the connection when its stdin ends: give it one that does not
    command: ["sh", "-c", "sleep 100000 | nc -l -p 9000 > /tmp/recv; touch /tmp/ended; sleep 3600"]
EOF
  kubectl -n $APP wait --for=condition=Ready pod/stream-server --timeout=60s >/dev/null
  local srv; srv=$(kubectl -n $APP get pod stream-server -o jsonpath='{.status.podIP}')
  kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: stream-client, namespace: $APP}
spec:
  nodeName: wk8s-n1
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft-test:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "i=0; while :; do i=\$((i+1)); echo \$i; sleep 0.2; done | nc $srv 9000; touch /tmp/ended; sleep 3600"]
EOF
  kubectl -n $APP wait --for=condition=Ready pod/stream-client --timeout=60s >/dev/null
  received() { kubectl -n $APP exec stream-server -- sh -c 'wc -l < /tmp/recv'; }
  poll "stream flowing" 30 sh -c "[ \"\$(kubectl -n $APP exec stream-server -- sh -c 'wc -l < /tmp/recv')\" -gt 5 ]"
  local before; before=$(mktemp); pod_ips > "$before"
  local old; old=$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o jsonpath='{.items[*].metadata.name}')

  step "upgrade: helm upgrade --set logLevel=debug (rolls the DaemonSet)"
  local samples; samples=$(mktemp)
  # samples: time, agents unavailable, lines received so far
  ( while :; do
      u=$(kubectl -n $SYS get ds weft -o jsonpath='{.status.numberUnavailable}' 2>/dev/null) || u=?
      echo "$(date +%s) ${u:-0} $(received 2>/dev/null || echo ?)"
      sleep 1
    done > "$samples" ) &
  SAMPLER=$!
  local t0; t0=$(date +%s)
  helm upgrade weft "$ROOT/helm/weft" --namespace $SYS --reuse-values --set logLevel=debug
  kubectl -n $SYS rollout status ds/weft --timeout=300s
  figure "upgrade: helm upgrade -> DaemonSet rolled out on 3 nodes: $(( $(date +%s) - t0 )) s"
  kill $SAMPLER; SAMPLER=
  # numberUnavailable is empty when 0
  local worst; worst=$(awk '$2 ~ /^[0-9]+$/ && $2 > m { m = $2 } END { print m + 0 }' "$samples")
  [ "$worst" -le 1 ] || fail "upgrade: $worst agents unavailable at once (maxUnavailable 1): $(cat "$samples")"
  local new p
  new=$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o jsonpath='{.items[*].metadata.name}')
  for p in $new; do case " $old " in *" $p "*) fail "upgrade: weft pod $p was not replaced" ;; esac; done
  kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o jsonpath='{range .items[*]}{.spec.containers[0].args}{"\n"}{end}' |
    grep -c 'log-level=debug' | grep -qx 3 || fail "upgrade: not every agent runs with the new value"
  # one node at a time: the agents' start times are minReadySeconds (5 s) apart or more
  kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o jsonpath='{range .items[*]}{.status.containerStatuses[0].state.running.startedAt}{"\n"}{end}' |
    python3 -c "
import sys, datetime
t = sorted(datetime.datetime.fromisoformat(l.strip().replace('Z', '+00:00')) for l in sys.stdin if l.strip())
gaps = [(b - a).total_seconds() for a, b in zip(t, t[1:])]
print('    agents started %s s apart' % gaps)
sys.exit(0 if len(t) == 3 and min(gaps) >= 5 else 'not rolled node by node: %s' % gaps)" || fail "upgrade: not one node at a time"
  echo "    at most $worst agent unavailable at any sample; all 3 replaced"
  # the stream: still the same connection (nc never reconnects) and still flowing, in order
  local n1 n2
  n1=$(received)
  poll "stream still flowing after the upgrade" 30 sh -c "[ \"\$(kubectl -n $APP exec stream-server -- sh -c 'wc -l < /tmp/recv')\" -gt $(( n1 + 5 )) ]"
  kubectl -n $APP exec stream-client -- sh -c '! [ -e /tmp/ended ]' || fail "upgrade: the client's stream ended"
  kubectl -n $APP exec stream-server -- sh -c '! [ -e /tmp/ended ]' || fail "upgrade: the server's stream ended"
  kubectl -n $APP exec stream-server -- awk 'NR != $1 { print "gap at line " NR ": " $1; exit 1 }' /tmp/recv ||
    fail "upgrade: the stream lost or reordered data"
  n2=$(received)
  # the longest time the receiver saw no new data, from the samples
  local stall; stall=$(awk '$3 ~ /^[0-9]+$/ && $3 != last { if (t && $1 - t > m) m = $1 - t; t = $1; last = $3 } END { print m + 0 }' "$samples")
  figure "upgrade: TCP stream wk8s-n1 -> wk8s-n2 survived ($n2 lines in order, longest stall seen ~${stall} s)"
  same_ips "$before" || fail "upgrade: pod addresses changed"
  echo "    every pod kept its address ($(grep -c "^$APP/" "$before") pods)"
  rm -f "$before" "$samples"
  kubectl -n $APP delete pod stream-client stream-server --wait=false >/dev/null
}

# the ranges ("a-b") of LIST2 cover every range of LIST1
covers() { # JSON-LIST1 JSON-LIST2
  python3 -c "
import ipaddress, json, sys
def rs(j): return [tuple(int(ipaddress.ip_address(x)) for x in r.split('-')) for r in json.loads(j)]
a, b = rs(sys.argv[1]), rs(sys.argv[2])
sys.exit(0 if a and all(any(c <= s and e <= d for c, d in b) for s, e in a) else 1)" "$1" "$2"
}

reclaimed_by_one() { # GONE-RANGES NODE...: exactly one NODE owns all of GONE-RANGES
  local gone=$1 n owners="" own; shift
  for n in "$@"; do
    own=$(status_get "$n" "r['ipam']['owned']") || return 1
    if covers "$gone" "$own"; then owners="$owners $n"; fi
  done
  [ "$(echo $owners | wc -w)" = 1 ] && echo "$owners"
}

# no NODE counts space as unreachable or owned by PEER
ring_settled() { # PEER NODE...
  local peer=$1 n; shift
  for n in "$@"; do
    [ "$(status_get "$n" "(r['ipam']['unreachable'], any(p['peer'] == '$peer' and p['owned'] for p in r['ipam']['peers']))")" = '[0, false]' ] || return 1
  done
}

phase_reclaim() {
  step "reclaim: wk8s-n3 with pods goes away"
  local gone=wk8s-n3 peer ranges
  [ "$(kubectl -n $APP get pods -l app=web --field-selector spec.nodeName=$gone -o name | wc -l)" -ge 1 ] ||
    fail "reclaim: no pods on $gone"
  peer=$(status_get $gone "r['peer']['name']")
  ranges=$(status_get $gone "r['ipam']['owned']")
  echo "    $gone is peer $peer, owns $ranges"
  [ "$ranges" != "[]" ] || fail "reclaim: $gone owns no address space"
  # the machine goes away: kubelet stopped, agent and pods killed, link to the other nodes down
  kill "$(cat "$D/n3/kubelet.pid")"
  local c
  for c in $("$LAB" exec $gone ctr -n k8s.io tasks ls -q); do
    "$LAB" exec $gone ctr -n k8s.io tasks kill -s SIGKILL -a "$c" >/dev/null 2>&1 || true
  done
  ip -n wk8s-ul link set n3 down
  local t0; t0=$(date +%s)
  kubectl delete node $gone --wait=true --timeout=60s
  local owner end=$(( t0 + 30 ))
  until owner=$(reclaimed_by_one "$ranges" wk8s-n1 wk8s-n2); do
    [ "$(date +%s)" -lt "$end" ] || fail "reclaim: $gone's space $ranges not owned by exactly one agent 30 s after kubectl delete node"
    sleep 1
  done
  owner=${owner# }
  figure "reclaim: $gone's space $ranges owned by exactly one agent ($owner) $(( $(date +%s) - t0 )) s after kubectl delete node"
  poll "reclaim: both agents agree, nothing owned by $peer, no space unreachable" 30 ring_settled "$peer" wk8s-n1 wk8s-n2
  kubectl -n $SYS logs -l app.kubernetes.io/name=weft -c weft --tail=-1 --prefix | grep -iE 'reclaim|rmpeer|lease' | tail -n 6 | cut -c1-250 | sed 's/^/      /' || true
  # new pods on the reclaiming node: they get addresses (in the reclaimed space when the node's
  # allocator picks it), never one already held
  kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: after-reclaim, namespace: $APP}
spec:
  replicas: 8
  selector: {matchLabels: {app: after-reclaim}}
  template:
    metadata: {labels: {app: after-reclaim}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {kubernetes.io/hostname: $owner}
      containers:
      - {name: c, image: localhost/weft-test:latest, imagePullPolicy: Never, command: ["sleep", "3600"]}
EOF
  kubectl -n $APP rollout status deploy/after-reclaim --timeout=120s
  local new_ips in_gone
  new_ips=$(kubectl -n $APP get pods -l app=after-reclaim -o jsonpath='{.items[*].status.podIP}')
  in_gone=$(for ip in $new_ips; do covers "[\"$ip-$ip\"]" "$ranges" && echo "$ip"; done || true)
  in_gone=$(echo $in_gone)
  figure "reclaim: 8 new pods on $owner Running ($new_ips); in $gone's former space: ${in_gone:-none}"
  # the node's allocator picks its older space first; ask for an address inside the reclaimed
  # space explicitly, for a network namespace on that node (what weft-cni asks for a pod)
  local sub agent got
  sub=$(python3 -c "
import ipaddress, json, sys
a, b = json.loads(sys.argv[1])[0].split('-')
print(next(ipaddress.summarize_address_range(ipaddress.ip_address(a), ipaddress.ip_address(b))))" "$ranges")
  "$LAB" exec "$owner" ip netns add reclaim-probe
  agent=$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft --field-selector spec.nodeName="$owner" -o name)
  got=$(kubectl -n $SYS exec "$agent" -c weft -- weft attach "net:$sub" --netns /run/netns/reclaim-probe) ||
    fail "reclaim: $owner cannot give an address in the reclaimed $sub: $got"
  covers "[\"${got%/*}-${got%/*}\"]" "$ranges" || fail "reclaim: attach in $sub gave $got, outside $ranges"
  figure "reclaim: $owner hands out ${got} from $gone's former space ($sub)"
  kubectl -n $SYS exec "$agent" -c weft -- weft detach --netns /run/netns/reclaim-probe >/dev/null
  "$LAB" exec "$owner" ip netns del reclaim-probe
  # the pods of the deleted node are removed by the pod garbage collector; the Deployment replaces them
  poll "web back to 6 Ready pods" 120 sh -c "[ \"\$(kubectl -n $APP get deploy web -o jsonpath='{.status.readyReplicas}')\" = 6 ]"
  no_duplicate_ips

  step "reclaim: $gone comes back as a new machine (same name, empty /var/lib/weft)"
  rm -rf "$D/n3/root/var/lib/weft/"* "$D/n3/root/etc/cni/net.d/"*
  ip -n wk8s-ul link set n3 up
  t0=$(date +%s)
  "$LAB" up --nodes $NODES >/dev/null
  kubectl wait --for=condition=Ready node/$gone --timeout=180s
  kubectl -n $SYS rollout status ds/weft --timeout=180s
  poll "every agent connected to every other" 90 mesh_complete wk8s-n1 wk8s-n2 wk8s-n3
  figure "reclaim: $gone back (new peer $(status_get $gone "r['peer']['name']")) Ready and meshed in $(( $(date +%s) - t0 )) s"
  no_duplicate_ips
}

phase_uninstall() {
  step "uninstall: helm uninstall weft"
  clear_workloads
  helm uninstall weft --namespace $SYS --wait --timeout 120s
  poll "weft pods gone" 120 sh -c "[ -z \"\$(kubectl -n $SYS get pods -l app.kubernetes.io/name=weft -o name)\" ]"
  local n
  for n in $(kubectl get nodes -o name); do
    "$LAB" exec "${n#node/}" sh -c '[ -f /etc/cni/net.d/10-weft.conflist ] && [ -x /opt/cni/bin/weft-cni ]' ||
      fail "after helm uninstall: ${n#node/} lost the conflist or weft-cni (documented to stay)"
  done
  [ -z "$(kubectl get clusterrole,clusterrolebinding -o name | grep -w weft)" ] || fail "helm uninstall left RBAC objects"
  # documented: a pod created now waits (no agent) ...
  kubectl create namespace $APP >/dev/null
  kubectl -n $APP run waiter --image=localhost/weft-test:latest --image-pull-policy=Never --restart=Never \
    --overrides='{"spec":{"terminationGracePeriodSeconds":1}}' -- sleep 3600 >/dev/null
  sleep 15   # not synchronisation: the claim is that nothing happens during this time
  [ "$(kubectl -n $APP get pod waiter -o jsonpath='{.status.phase}')" = Pending ] ||
    fail "without weft a new pod should stay Pending (ContainerCreating)"
  echo "    as documented: conflist and weft-cni stay; a new pod waits: $(kubectl -n $APP get pod waiter --no-headers | awk '{print $3}')"
  step "uninstall: helm install again"
  local t0; t0=$(date +%s)
  helm install weft "$ROOT/helm/weft" --namespace $SYS
  wait_weft reinstall "$t0"
  kubectl -n $APP wait --for=condition=Ready pod/waiter --timeout=120s >/dev/null ||
    fail "the waiting pod did not start after the reinstall"
  figure "reinstall: the waiting pod Running $(( $(date +%s) - t0 )) s after helm install, at $(kubectl -n $APP get pod waiter -o jsonpath='{.status.podIP}')"
  no_duplicate_ips
  helm uninstall weft --namespace $SYS --wait --timeout 120s
}

# ---------------------------------------------------------------------------------------------

main() {
  [ "$(id -u)" = 0 ] || fail "run as root"
  # the lab is one per machine: wait for someone else's run to finish rather than tearing it down
  end=$(( $(date +%s) + ${WEFT_LAB_WAIT:-600} ))
  while ip netns list | grep -q '^wk8s-'; do
    [ "$(date +%s)" -lt "$end" ] || fail "the lab (netns wk8s-*) is in use; '$LAB down' if it is stale"
    [ -n "${waited:-}" ] || { echo "the lab is in use (netns wk8s-*): waiting up to ${WEFT_LAB_WAIT:-600} s"; waited=1; }
    sleep 5
  done
  [ ! -e "$D" ] || "$LAB" down >/dev/null 2>&1 || true
  trap finish EXIT
  # killed (e.g. by a CI timeout): fail with diagnostics, never report a pass
  trap 'exit 143' TERM
  trap 'exit 130' INT

  step "manifests: chart lint and drift check"
  "$ROOT/scripts/manifests.sh" --check
  step "image"
  "$ROOT/scripts/image.sh"
  step "lab up ($NODES nodes)"
  "$LAB" up --nodes $NODES
  eval "$("$LAB" env)"
  [ "$(kubectl get nodes -o name | wc -l)" = $NODES ] || fail "expected $NODES nodes"

  if want apply; then phase_apply; fi
  if want helm; then phase_helm; fi
  if want upgrade; then phase_upgrade; fi
  if want reclaim; then phase_reclaim; fi
  if want uninstall; then phase_uninstall; fi
}

# sourcing the script (for debugging) only defines the functions
[ "${BASH_SOURCE[0]}" != "$0" ] || main "$@"
