#!/bin/bash
# Test of the Kubernetes lab itself (issue 14): brings up 2 nodes with scripts/k8s-lab.sh, installs
# the reference `bridge` + `host-local` CNI plugins and a conflist by hand into each node's own
# /opt/cni/bin and /etc/cni/net.d, and checks that
#   - each node's CNI directories are its own (node 2 does not see node 1's files),
#   - both nodes become Ready,
#   - a DaemonSet of localhost/weft-test:latest (imagePullPolicy: Never) runs one pod per node, with
#     an IP from that node's podCIDR, reachable from its node,
#   - kube-proxy serves a ClusterIP Service (internalTrafficPolicy: Local) from the node,
#   - a hostNetwork pod with a hostPath volume writes into its own node's /etc/cni/net.d only (what a
#     CNI installer does) and reaches the API server through the kubernetes Service (10.96.0.1),
#   - `kubectl exec` into a pod works,
#   - `kubectl delete node` removes the node.
# Every wait polls with a deadline. On failure it prints cluster state and node logs and exits 1.
# It always tears the lab down at the end (WK8S_KEEP=1 keeps it after a failure, for debugging).
# Needs root, Go (first run builds Kubernetes: ~15 min cold), and the apt packages in docs/testing.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LAB=$ROOT/scripts/k8s-lab.sh
D=${WK8S_DIR:-/var/lib/wk8s}
NS=wk8s-smoke
START=$(date +%s)

step() { echo "==> [$(( $(date +%s) - START ))s] $*"; }

dump() {
  echo "----- diagnostics -----"
  if command -v kubectl >/dev/null && [ -n "${KUBECONFIG:-}" ]; then
    kubectl get nodes -o wide || true
    kubectl get pods -A -o wide || true
    kubectl -n $NS describe ds,pods || true
    kubectl get events -A --sort-by=.lastTimestamp | tail -n 40 || true
  fi
  local f
  for f in "$D"/cp/*.log "$D"/n*/log/*.log; do
    [ -f "$f" ] || continue
    echo "----- tail $f"
    tail -n 15 "$f" | cut -c1-400
  done
}

finish() {
  local rc=$?
  set +e
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
  [ $rc -eq 0 ] && echo "PASS: k8s lab smoke test ($(( $(date +%s) - START ))s)"
  exit $rc
}

fail() { echo "FAIL: $*" >&2; exit 1; }

# poll DESCRIPTION SECONDS CMD...: until CMD succeeds, or fail at the deadline
poll() {
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${secs}s: $what"
    sleep 1
  done
}

[ "$(id -u)" = 0 ] || fail "run as root"
"$LAB" down >/dev/null 2>&1 || true
trap finish EXIT

step "lab up (2 nodes)"
"$LAB" up --nodes 2
eval "$("$LAB" env)"
kubectl version
[ "$(kubectl get nodes -o name | wc -l)" = 2 ] || fail "expected 2 nodes"

step "installing bridge + host-local on each node by hand"
for i in 1 2; do
  node=wk8s-n$i
  poll "podCIDR of $node" 60 sh -c "[ -n \"\$(kubectl get node $node -o jsonpath='{.spec.podCIDR}')\" ]"
  cidr=$(kubectl get node $node -o jsonpath='{.spec.podCIDR}')
  echo "$node podCIDR $cidr"
  "$LAB" exec $node sh -c 'cp /usr/lib/cni/bridge /usr/lib/cni/host-local /opt/cni/bin/'
  "$LAB" exec $node sh -c "cat > /etc/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "smoke",
  "plugins": [
    { "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$cidr" }]], "routes": [{ "dst": "0.0.0.0/0" }] } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  if [ $i = 1 ]; then
    # the directories are the node's own: node 2 has not got node 1's plugin or config
    "$LAB" exec wk8s-n2 sh -c '[ ! -e /opt/cni/bin/bridge ] && [ -z "$(ls /etc/cni/net.d)" ]' ||
      fail "node 2 sees node 1's CNI files"
    [ ! -e /etc/cni/net.d/10-bridge.conflist ] || fail "the conflist leaked into the host's /etc/cni/net.d"
  fi
done

step "waiting for both nodes to be Ready"
kubectl wait --for=condition=Ready node --all --timeout=180s

step "DaemonSet of localhost/weft-test:latest"
kubectl create namespace $NS
kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: weft-test, namespace: $NS}
spec:
  selector: {matchLabels: {app: weft-test}}
  template:
    metadata: {labels: {app: weft-test}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: localhost/weft-test:latest
        imagePullPolicy: Never
        command: ["httpd", "-f", "-p", "8080", "-h", "/var/www"]
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: weft-test, namespace: $NS}
spec:
  selector: {app: weft-test}
  internalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080}]
EOF
kubectl -n $NS rollout status ds/weft-test --timeout=180s
poll "2 Running pods" 60 sh -c "[ \"\$(kubectl -n $NS get pods -l app=weft-test --field-selector=status.phase=Running -o name | wc -l)\" = 2 ]"
kubectl -n $NS get pods -o wide
for i in 1 2; do
  node=wk8s-n$i
  [ "$(kubectl -n $NS get pods -l app=weft-test --field-selector spec.nodeName=$node,status.phase=Running -o name | wc -l)" = 1 ] ||
    fail "expected exactly one Running pod on $node"
  pod=$(kubectl -n $NS get pods -l app=weft-test --field-selector spec.nodeName=$node -o jsonpath='{.items[0].metadata.name}')
  ip=$(kubectl -n $NS get pod "$pod" -o jsonpath='{.status.podIP}')
  cidr=$(kubectl get node $node -o jsonpath='{.spec.podCIDR}')
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') not in ipaddress.ip_network('$cidr'))" ||
    fail "pod $pod has IP $ip outside $node's podCIDR $cidr"
  poll "$node to reach its pod $ip:8080" 30 "$LAB" exec $node timeout 5 busybox wget -q -O /dev/null "http://$ip:8080/"
  out=$("$LAB" exec $node timeout 5 busybox wget -q -O - "http://$ip:8080/") || fail "$node cannot reach its pod $ip"
  [ "$out" = weft-test ] || fail "unexpected answer from $ip: $out"
  echo "$node: pod $pod $ip answers"
done

step "kube-proxy: ClusterIP Service from the node"
svc=$(kubectl -n $NS get svc weft-test -o jsonpath='{.spec.clusterIP}')
poll "Service $svc:80 from wk8s-n1" 60 "$LAB" exec wk8s-n1 timeout 3 busybox wget -q -O /dev/null "http://$svc:80/"
"$LAB" exec wk8s-n1 iptables-save -t nat | grep -q -- "-d $svc/32 .*-j KUBE-SV" || fail "no kube-proxy rule for $svc on wk8s-n1"

step "kubectl exec"
pod1=$(kubectl -n $NS get pods -l app=weft-test --field-selector spec.nodeName=wk8s-n1 -o jsonpath='{.items[0].metadata.name}')
ip1=$(kubectl -n $NS get pod "$pod1" -o jsonpath='{.status.podIP}')
out=$(kubectl -n $NS exec "$pod1" -- sh -c 'ip -4 -o addr show eth0; cat /var/www/index.html')
echo "$out"
echo "$out" | grep -q " $ip1/" || fail "kubectl exec: eth0 of $pod1 does not have $ip1"
echo "$out" | grep -qx weft-test || fail "kubectl exec: unexpected output"
gw=$(kubectl -n $NS exec "$pod1" -- sh -c "ip route | awk '/default/ {print \$3}'")
kubectl -n $NS exec "$pod1" -- ping -c 1 -W 3 "$gw" >/dev/null || fail "pod cannot ping its gateway $gw"

step "a hostNetwork pod on wk8s-n2 writes its node's /etc/cni/net.d and reaches the API via 10.96.0.1"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: installer, namespace: $NS}
spec:
  nodeName: wk8s-n2
  hostNetwork: true
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft-test:latest
    imagePullPolicy: Never
    # busybox's TLS cannot talk to the API server (no common cipher); plain HTTP to its TLS port
    # gets Go's "Client sent an HTTP request to an HTTPS server", which proves the path
    command: ["sh", "-c", "echo installed-by-pod > /host/net.d/smoke-marker &&
      printf 'GET /version HTTP/1.0\\r\\n\\r\\n' | nc -w 5 \$KUBERNETES_SERVICE_HOST \$KUBERNETES_SERVICE_PORT"]
    volumeMounts: [{name: netd, mountPath: /host/net.d}]
  volumes: [{name: netd, hostPath: {path: /etc/cni/net.d}}]
EOF
kubectl -n $NS wait --for=jsonpath='{.status.phase}'=Succeeded pod/installer --timeout=60s ||
  fail "installer pod did not succeed: $(kubectl -n $NS logs installer 2>&1 | tail -n 5)"
kubectl -n $NS logs installer | grep -q 'HTTP request to an HTTPS server' ||
  fail "hostNetwork pod did not reach the API server through the kubernetes Service: $(kubectl -n $NS logs installer)"
"$LAB" exec wk8s-n2 grep -qx installed-by-pod /etc/cni/net.d/smoke-marker || fail "marker not in wk8s-n2's /etc/cni/net.d"
"$LAB" exec wk8s-n1 sh -c '! [ -e /etc/cni/net.d/smoke-marker ]' || fail "marker leaked into wk8s-n1's /etc/cni/net.d"
[ ! -e /etc/cni/net.d/smoke-marker ] || fail "marker leaked into the host's /etc/cni/net.d"
"$LAB" exec wk8s-n2 rm -f /etc/cni/net.d/smoke-marker

step "kubectl delete node"
kubectl delete node wk8s-n2 --wait=true --timeout=60s
poll "node wk8s-n2 to disappear" 60 sh -c '! kubectl get node wk8s-n2'
# and it stays removed (the kubelet registers only once per start) over two node-status periods
end=$(( $(date +%s) + 20 ))
while [ "$(date +%s)" -lt "$end" ]; do
  [ "$(kubectl get nodes -o name)" = node/wk8s-n1 ] || fail "expected only node/wk8s-n1, got: $(kubectl get nodes -o name)"
  sleep 2
done
kubectl get nodes
