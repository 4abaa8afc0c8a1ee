#!/bin/bash
# Benchmark (not a test) of NetworkPolicy enforcement on the lab's real 3-node cluster, weft
# installed from manifests/ as tests/k8s/netpol-lab.sh does it. One run measures:
#   throughput   pod->pod TCP across nodes (client on wk8s-n1, server on wk8s-n2, 5 s streams of
#                weft-netprobe) with 0 and with 500 policies selecting both pods, interleaved
#                ROUNDS times by labelling the two pods into and out of the policies' selector
#                (each switch is checked: a third pod is refused, then let in); prints the medians
#                and their ratio
#   strict       the throughput rounds again with every agent on --policy-strict (every packet
#                a pod sends goes through its policy chains, not only a connection's first)
#   enforcement  with 5000 simulated pods (Pod objects bound to 10 Node objects that have no
#                kubelet, their status written through the API, so that weft sees them as any
#                remote pod) and 1000 policies (the 500 above and 500 that let groups of
#                simulated pods reach the server or the client reach them): the time from the
#                start of `kubectl apply` of a policy letting the client reach the server's port
#                5202 to the first connection the client's pod makes there, and from the start of
#                `kubectl delete` of it to the first one refused; ROUNDS times each
# Prints one line per figure; docs/benchmarks.md records them. Needs what tests/k8s/weft.sh needs
# and the release binaries (cargo build --release --workspace --bins).
#   sudo scripts/netpol-bench.sh [ROUNDS]    (default 3)
#   WEFT_NETPOL_LAB=reuse                    on a lab that is already up with weft (left up)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAB=$ROOT/scripts/k8s-lab.sh
ROUNDS=${1:-3}
BIN=${WEFT_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
NS=netpol-bench
SIM=netpol-sim
POLICIES=500
SIM_PODS=5000
SIM_NODES=10
SIM_GROUPS=50
STREAM_S=5
PROXY_PORT=18011
IMAGE=localhost/weft-netprobe:latest

die() { echo "netpol-bench: error: $*" >&2; exit 1; }
say() { echo "netpol-bench: $*"; }
now_ms() { date +%s%3N; }

[ "$(id -u)" = 0 ] || die "run as root"
TMP=$(mktemp -d)
cleanup() {
  [ -z "${PROXY:-}" ] || kill "$PROXY" 2>/dev/null || true
  if [ "${WEFT_NETPOL_LAB:-}" = reuse ]; then
    [ -z "${STRICT:-}" ] || kubectl -n kube-system rollout undo daemonset/weft >/dev/null 2>&1 || true
    kubectl delete namespace $NS $SIM --wait=false >/dev/null 2>&1 || true
    kubectl -n $SIM delete pods --all --force --grace-period=0 >/dev/null 2>&1 || true
    kubectl delete nodes -l netpol-bench=sim >/dev/null 2>&1 || true
  else
    "$ROOT/tests/k8s/netpol-lab.sh" down >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

if [ "${WEFT_NETPOL_LAB:-}" != reuse ]; then
  [ -x "$BIN/weft-netprobe" ] || die "no $BIN/weft-netprobe (cargo build --release --workspace --bins)"
  WEFT_BIN_DIR=$BIN NETPROBE_BIN=$BIN/weft-netprobe "$ROOT/tests/k8s/netpol-lab.sh" up >&2
fi
eval "$("$LAB" env)"

poll() { # SECONDS CMD...: until CMD succeeds
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || die "timed out: $*"; sleep 0.2; done
}
probe() { kubectl -n $NS exec "$1" -- /weft-netprobe "${@:2}"; }
# the state of a new TCP connection from pod $1 to $2 (IP:PORT): ok or denied
state() { probe "$1" watch "$2" 0 2>/dev/null | sed -n 's/^start //p' || true; }
state_is() { [ "$(state "$1" "$2")" = "$3" ]; }
median() { python3 -c 'import statistics, sys; print("%.3f" % statistics.median(float(a) for a in sys.argv[1:]))' "$@"; }

pod() { # NAME NODE LABEL ARGS
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {app: $1}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers: [{name: p, image: $IMAGE, imagePullPolicy: Never, args: $3}]
---
EOF
}

# ---- the pods
kubectl create namespace $NS >/dev/null
{ pod server wk8s-n2 '[sink, "5201", "5202"]'; pod client wk8s-n1 '[sink, "9"]'; pod third wk8s-n3 '[sink, "9"]'; } |
  kubectl apply -f - >/dev/null
kubectl -n $NS wait --for=condition=Ready pod --all --timeout=180s >/dev/null
SERVER=$(kubectl -n $NS get pod server -o jsonpath='{.status.podIP}')
[ -n "$SERVER" ] || die "the server pod has no address"

# ---- throughput: 500 policies selecting both pods when they carry bench=on
for i in $(seq 1 $POLICIES); do
  cat <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: tp-$i, namespace: $NS}
spec:
  podSelector: {matchLabels: {bench: "on"}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 5201}, {port: $((10000 + i))}]}]
  egress: [{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 5201}, {port: $((10000 + i))}]}]
---
EOF
done > "$TMP/tp.yaml"
T0=$(now_ms)
kubectl create -f "$TMP/tp.yaml" >/dev/null
say "created $POLICIES policies in $(( $(now_ms) - T0 )) ms"

stream() { probe client stream "$SERVER:5201" $STREAM_S | awk '/^gbit_per_s/ { print $2 }'; }

throughput() { # LABEL: ROUNDS of (no policy selects the pods, 500 do), interleaved
  local off=() on=() r
  for r in $(seq 1 "$ROUNDS"); do
    kubectl -n $NS label pod server client bench- >/dev/null
    poll 30 state_is third "$SERVER:5201" ok
    off+=("$(stream)")
    kubectl -n $NS label pod server client bench=on >/dev/null
    poll 30 state_is third "$SERVER:5201" denied
    on+=("$(stream)")
    say "$1throughput round $r: 0 policies ${off[-1]} Gbit/s, $POLICIES policies ${on[-1]} Gbit/s"
  done
  local m0 m1; m0=$(median "${off[@]}") m1=$(median "${on[@]}")
  say "$1throughput median: 0 policies $m0 Gbit/s, $POLICIES policies $m1 Gbit/s, ratio $(python3 -c "print('%.3f' % ($m1 / $m0))")"
}

# every agent's links to the two others on fastdp (after a restart, until heartbeats pass)
all_fastdp() {
  local i
  for i in 1 2 3; do
    python3 - "10.98.0.$((10 + i))" <<'EOF' || return 1
import json, sys, urllib.request
r = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}:6782/status", timeout=5))
links = r["overlay"]["links"]
sys.exit(0 if len(links) == 2 and all(l["mode"] == "fastdp" for l in links) else 1)
EOF
  done
}

poll 120 all_fastdp
throughput ""

# ---- 5000 simulated pods on 10 Node objects with no kubelet
kubectl create namespace $SIM >/dev/null
for n in $(seq 1 $SIM_NODES); do
  echo "{\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {\"name\": \"wk8s-sim-$n\", \"labels\": {\"netpol-bench\": \"sim\"}}}"
done | kubectl create -f - >/dev/null
poll 60 kubectl -n $SIM get serviceaccount default
kubectl proxy --port=$PROXY_PORT >"$TMP/proxy.log" 2>&1 &
PROXY=$!
poll 30 python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PROXY_PORT/version')"
T0=$(now_ms)
python3 - "$PROXY_PORT" "$SIM" "$SIM_PODS" "$SIM_NODES" "$SIM_GROUPS" "$IMAGE" <<'EOF'
# Creates the simulated pods and writes each one's status (Running, an address in 172.30/16)
# through the API, eight connections at once.
import http.client, json, sys, threading
port, ns, count, nodes, groups, image = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
errors = []
def call(c, method, path, body, ctype):
    c.request(method, path, json.dumps(body), {"Content-Type": ctype})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        errors.append(f"{method} {path}: {r.status} {data[:200]!r}")
def work(first):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(first, count, 8):
        name = f"sim-{i}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"group": f"g{i % groups}"}},
               "spec": {"nodeName": f"wk8s-sim-{i % nodes + 1}", "terminationGracePeriodSeconds": 0,
                        "automountServiceAccountToken": False,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "p", "image": image}]}}
        call(c, "POST", f"/api/v1/namespaces/{ns}/pods", pod, "application/json")
        ip = f"172.30.{i // 250}.{i % 250 + 1}"
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        call(c, "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", status,
             "application/merge-patch+json")
threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    sys.exit(f"{len(errors)} API calls failed, the first: {errors[0]}")
EOF
say "created $SIM_PODS simulated pods with their status in $(( $(now_ms) - T0 )) ms"

for i in $(seq 1 $POLICIES); do
  g=g$(( i % SIM_GROUPS ))
  if [ $(( i % 2 )) = 0 ]; then
    rule="policyTypes: [Ingress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: $SIM}}, podSelector: {matchLabels: {group: $g}}}], ports: [{port: $((20000 + i))}]}]"
    sel=server
  else
    rule="policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: $SIM}}, podSelector: {matchLabels: {group: $g}}}], ports: [{port: $((20000 + i))}]}]"
    sel=client
  fi
  cat <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sim-$i, namespace: $NS}
spec:
  podSelector: {matchLabels: {app: $sel}}
  $rule
---
EOF
done > "$TMP/sim.yaml"
T0=$(now_ms)
kubectl create -f "$TMP/sim.yaml" >/dev/null
say "created $POLICIES more policies in $(( $(now_ms) - T0 )) ms ($(kubectl get networkpolicy -A -o name | wc -l) in the cluster, $(kubectl get pods -A -o name | wc -l) pods)"

cat > "$TMP/allow.yaml" <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-5202, namespace: $NS}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 5202}]}]
  egress: [{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 5202}]}]
EOF

# one change: starts the watch in the client's pod, then ACTION at T0; prints the milliseconds
# from T0 to the first connection attempt in the new state
timed_change() { # ACTION... (kubectl arguments)
  local out=$TMP/watch.$RANDOM t0 at
  probe client watch "$SERVER:5202" 30 >"$out" 2>&1 &
  local watcher=$!
  poll 30 grep -q '^start' "$out"
  t0=$(now_ms)
  kubectl "$@" >/dev/null
  wait $watcher || die "no change within 30 s of kubectl $*: $(cat "$out")"
  at=$(awk '/^change/ { print $2 }' "$out")
  echo $(( at - t0 ))
}

poll 60 state_is client "$SERVER:5202" denied
# the table on the server's node, as the kernel holds it, for the record
ELEMS=$(ip netns exec wk8s-n2 nft -j list table inet weft-policy | python3 -c '
import json, sys
items = json.load(sys.stdin)["nftables"]
sets = [i["set"] for i in items if "set" in i]
chains = sum(1 for i in items if "chain" in i)
rules = sum(1 for i in items if "rule" in i)
print(f"{chains} chains, {rules} rules, {len(sets)} sets and maps with {sum(len(s.get(\"elem\", [])) for s in sets)} elements")')
say "wk8s-n2's table: $ELEMS"
ADD=() DEL=()
for r in $(seq 1 "$ROUNDS"); do
  ADD+=("$(timed_change apply -f "$TMP/allow.yaml")")
  DEL+=("$(timed_change -n $NS delete networkpolicy allow-5202)")
  say "enforcement round $r: kubectl apply -> first connection allowed ${ADD[-1]} ms; kubectl delete -> first refused ${DEL[-1]} ms"
done
say "enforcement with $(( 2 * POLICIES )) policies and $SIM_PODS simulated pods: apply median $(median "${ADD[@]}") ms, max $(printf '%s\n' "${ADD[@]}" | sort -n | tail -1) ms; delete median $(median "${DEL[@]}") ms, max $(printf '%s\n' "${DEL[@]}" | sort -n | tail -1) ms"

# ---- strict mode: the throughput rounds again with every packet checked
kubectl delete -f "$TMP/sim.yaml" >/dev/null
STRICT=1
kubectl -n kube-system patch daemonset weft --type=json \
  -p '[{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--policy-strict"}]' >/dev/null
kubectl -n kube-system rollout status daemonset/weft --timeout=240s >/dev/null
poll 120 all_fastdp
throughput "--policy-strict: "
