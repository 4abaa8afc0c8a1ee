#!/bin/bash
# Benchmark (not a test) of NetworkPolicy enforcement on the lab's real 3-node cluster, weft
# installed from manifests/ as tests/k8s/netpol-lab.sh does it. One run measures:
#   throughput   pod->pod TCP across nodes: two pairs (clients on wk8s-n1, servers on wk8s-n2)
#                stream at once for 10 s (weft-netprobe), one pair selected by 500 policies and
#                the other by none, so that both see the same load on the machine; ROUNDS times,
#                the selected pair swapped each round (each switch checked: a third pod is
#                refused by the selected server, let in by the other); prints each round's ratio
#                selected / not selected and the median ratio
#   enforcement  with 5000 simulated pods (Pod objects bound to 10 Node objects that have no
#                kubelet, their status written through the API, so that weft sees them as any
#                remote pod) and 1000 policies (the 500 above and 500 that let groups of
#                simulated pods reach the server or the client reach them): the time from the
#                start of `kubectl apply` of a policy letting the client reach the server's port
#                5202 to the first connection the client's pod makes there, and from the start of
#                `kubectl delete` of it to the first one refused; ROUNDS times each
#   strict       the throughput rounds again with every agent on --policy-strict (every packet
#                a pod sends goes through its policy chains, not only a connection's first)
# Prints one line per figure; docs/benchmarks.md records them. Needs what tests/k8s/weft.sh needs
# and the release binaries (cargo build --release --workspace --bins).
#   sudo scripts/netpol-bench.sh [ROUNDS]    (default 6)
#   WEFT_NETPOL_LAB=reuse                    on a lab that is already up with weft (left up)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAB=$ROOT/scripts/k8s-lab.sh
ROUNDS=${1:-6}
BIN=${WEFT_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
NS=netpol-bench
SIM=netpol-sim
POLICIES=500
SIM_PODS=5000
SIM_NODES=10
SIM_GROUPS=50
STREAM_S=10
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

pod() { # NAME NODE ARGS: labels app (the name without its -a/-b) and pair (a, b)
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {app: ${1%-?}, pair: "${1##*-}"}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers: [{name: p, image: $IMAGE, imagePullPolicy: Never, args: $3}]
---
EOF
}

# ---- the pods
kubectl create namespace $NS >/dev/null
{ for p in a b; do pod server-$p wk8s-n2 '[sink, "5201", "5202"]'; pod client-$p wk8s-n1 '[sink, "9"]'; done
  pod third wk8s-n3 '[sink, "9"]'; } | kubectl apply -f - >/dev/null
kubectl -n $NS wait --for=condition=Ready pod --all --timeout=180s >/dev/null
declare -A ADDR
for p in a b; do
  ADDR[$p]=$(kubectl -n $NS get pod server-$p -o jsonpath='{.status.podIP}')
  [ -n "${ADDR[$p]}" ] || die "server-$p has no address"
done
SERVER=${ADDR[a]}

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

select_pair() { # PAIR: its two pods carry bench=on, the other pair's none
  local other=b; [ "$1" = a ] || other=a
  kubectl -n $NS label pod server-$other client-$other bench- >/dev/null
  kubectl -n $NS label pod server-$1 client-$1 bench=on --overwrite >/dev/null
  poll 30 state_is third "${ADDR[$1]}:5201" denied
  poll 30 state_is third "${ADDR[$other]}:5201" ok
}

throughput() { # LABEL: ROUNDS of both pairs streaming at once, one selected by the policies
  local ratios=() r on off out=$TMP/stream
  for r in $(seq 1 "$ROUNDS"); do
    on=a off=b; [ $((r % 2)) = 1 ] || { on=b off=a; }
    select_pair $on
    probe client-$on stream "${ADDR[$on]}:5201" $STREAM_S >"$out.on" &
    probe client-$off stream "${ADDR[$off]}:5201" $STREAM_S >"$out.off"
    wait $! || die "the stream of pair $on failed: $(cat "$out.on")"
    local g1 g0
    g1=$(awk '/^gbit_per_s/ { print $2 }' "$out.on") g0=$(awk '/^gbit_per_s/ { print $2 }' "$out.off")
    ratios+=("$(python3 -c "print('%.3f' % ($g1 / $g0))")")
    say "$1throughput round $r: pair $on under $POLICIES policies $g1 Gbit/s, pair $off under none $g0 Gbit/s, ratio ${ratios[-1]}"
  done
  say "$1throughput: median ratio (500 policies / none) $(median "${ratios[@]}") over $ROUNDS rounds"
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
# client-a and server-a stay selected: client-a's egress is isolated from here on
select_pair a

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
  probe client-a watch "$SERVER:5202" 30 >"$out" 2>&1 &
  local watcher=$!
  poll 30 grep -q '^start' "$out"
  t0=$(now_ms)
  kubectl "$@" >/dev/null
  wait $watcher || die "no change within 30 s of kubectl $*: $(cat "$out")"
  at=$(awk '/^change/ { print $2 }' "$out")
  echo $(( at - t0 ))
}

poll 60 state_is client-a "$SERVER:5202" denied
# the table on the server's node, as the kernel holds it, for the record
ELEMS=$(ip netns exec wk8s-n2 nft -j list table inet weft-policy | python3 -c '
import json, sys
items = json.load(sys.stdin)["nftables"]
sets = [i["set"] for i in items if "set" in i]
chains = sum(1 for i in items if "chain" in i)
rules = sum(1 for i in items if "rule" in i)
elems = sum(len(s.get("elem", [])) for s in sets)
print(f"{chains} chains, {rules} rules, {len(sets)} sets and maps with {elems} elements")')
say "wk8s-n2's table: $ELEMS"
# what the agents of the client's and the server's nodes say the last program took
agent_times() {
  python3 - <<'EOF'
import json, urllib.request
out = []
for n in (1, 2):
    r = json.load(urllib.request.urlopen(f"http://10.98.0.{10 + n}:6782/status", timeout=5))["policy"]
    out.append(f"wk8s-n{n} compiled {r['compile_ms']} ms, wrote {r['write_ms']} ms")
print("; ".join(out))
EOF
}

ADD=() DEL=()
for r in $(seq 1 "$ROUNDS"); do
  ADD+=("$(timed_change apply -f "$TMP/allow.yaml")")
  T_ADD=$(agent_times)
  DEL+=("$(timed_change -n $NS delete networkpolicy allow-5202)")
  say "enforcement round $r: kubectl apply -> first connection allowed ${ADD[-1]} ms ($T_ADD); kubectl delete -> first refused ${DEL[-1]} ms ($(agent_times))"
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
