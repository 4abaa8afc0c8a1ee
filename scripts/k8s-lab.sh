#!/bin/bash
# A real Kubernetes cluster in network namespaces, built from source (scripts/k8s-build.sh).
#
#   scripts/k8s-lab.sh up [--nodes N]   build (or reuse) the binaries and bring the cluster up
#                                       (idempotent: starts what is missing, adds missing nodes)
#   scripts/k8s-lab.sh down             stop everything and remove all it made
#   scripts/k8s-lab.sh env              shell lines for: eval "$(scripts/k8s-lab.sh env)"
#   scripts/k8s-lab.sh status           processes, nodes
#   scripts/k8s-lab.sh exec NODE CMD... run CMD on a node (its network + mount namespace), e.g.
#                                       scripts/k8s-lab.sh exec wk8s-n1 ctr -n k8s.io containers ls
#   scripts/k8s-lab.sh import NODE|all TAR...   import image archives into node containerds
#
# Layout (see docs/testing.md):
#   netns wk8s-ul   underlay bridge br0, 10.98.0.0/24; the root netns joins it as wk8s0 10.98.0.1
#   netns wk8s-cp   10.98.0.2: etcd (127.0.0.1:2379), kube-apiserver :6443, controller-manager, scheduler
#   netns wk8s-nI   10.98.0.(10+I), node name wk8s-nI: containerd, kubelet, kube-proxy (iptables), each
#                   in the node's own mount namespace, where /etc/cni/net.d, /opt/cni/bin, /var/lib/cni,
#                   /var/lib/kubelet, /var/lib/containerd, /run/containerd, /run/netns, /var/log/pods,
#                   /var/log/containers, /etc/kubernetes, /etc/containerd, /var/lib/weft, /run/weft are the node's own
#                   directories ($WK8S_DIR/nI/root/...), so hostPath volumes and CNI installers see
#                   per-node directories exactly like on separate machines.
# Everything lives in $WK8S_DIR (default /var/lib/wk8s). Nothing is changed in the root netns except the
# link wk8s0; the host's kernel tunables are not touched (see node_mounts).
set -euo pipefail
# The daemons started here must not inherit the caller's descriptors: a lock held through
# `flock LOCK scripts/k8s-lab.sh up` would otherwise stay held by etcd and every kubelet for
# the life of the lab. 255 is bash's own handle on this script.
for fd in $(ls /proc/$$/fd); do
  case $fd in 0|1|2|255) ;; *) eval "exec $fd>&-" 2>/dev/null || true ;; esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
P=wk8s
D=${WK8S_DIR:-/var/lib/$P}
SUB=10.98.0
HOST_IP=$SUB.1
CP_IP=$SUB.2
SVC_CIDR=${WK8S_SERVICE_CIDR:-10.96.0.0/16}
SVC_IP=${WK8S_SERVICE_IP:-10.96.0.1}
CLUSTER_CIDR=${WK8S_CLUSTER_CIDR:-10.32.0.0/12}
NODE_MASK=${WK8S_NODE_CIDR_MASK:-24}
PAUSE_IMAGE=localhost/pause:3.10
TEST_IMAGE=localhost/weft-test:latest
# per-node directories: bind-mounted over these paths inside the node's mount namespace
NODE_DIRS="/etc/cni/net.d /opt/cni/bin /var/lib/cni /var/lib/kubelet /var/lib/containerd /run/containerd
  /run/netns /var/log/pods /var/log/containers /etc/kubernetes /etc/containerd /var/lib/weft /run/weft"
DEADLINE_API=${WK8S_API_TIMEOUT:-180}
DEADLINE_NODES=${WK8S_NODE_TIMEOUT:-180}

log() { echo "k8s-lab: $*" >&2; }
die() { echo "k8s-lab: error: $*" >&2; exit 1; }
node_ip() { echo "$SUB.$((10 + $1))"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

bindir() { "$ROOT/scripts/k8s-build.sh" --dir; }

need_tools() {
  local missing=""
  for t in ip nsenter unshare setsid openssl python3 containerd containerd-shim-runc-v2 runc ctr etcd \
      iptables busybox mount; do
    command -v "$t" >/dev/null 2>&1 || missing="$missing $t"
  done
  [ -d /usr/lib/cni ] || missing="$missing /usr/lib/cni(containernetworking-plugins)"
  [ -z "$missing" ] || die "missing:$missing
  apt-get install containerd runc containernetworking-plugins etcd-server iptables busybox-static openssl python3"
  [ "$(id -u)" = 0 ] || die "run as root"
}

# start NAME PIDFILE LOG CMD...: run CMD detached, its pid in PIDFILE (nothing if already running)
start() {
  local name=$1 pidfile=$2 logf=$3; shift 3
  if alive "$pidfile"; then return 0; fi
  log "starting $name"
  rm -f "$pidfile"
  setsid -f sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" >>"$logf" 2>&1 </dev/null
  local i
  for i in $(seq 1 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
}

# wait_for DESCRIPTION SECONDS CMD...: poll CMD until it succeeds or the deadline passes (or, when
# WAIT_PID names a pidfile, its process exits)
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { log "timed out after ${secs}s waiting for $what"; return 1; }
    if [ -n "${WAIT_PID:-}" ] && ! alive "$WAIT_PID"; then log "$WAIT_PID: process exited"; return 1; fi
    sleep 1
  done
}

# put FILE: write stdin to FILE only when the content differs (kube-proxy exits when its config
# file is written, so an idempotent `up` must not touch unchanged files)
put() {
  local tmp; tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

# ---------------------------------------------------------------------------------------------
# PKI and kubeconfigs

cert() { # NAME CN ORG EXT...: a client/server certificate signed by the lab CA (EC P-256)
  local n=$1 cn=$2 org=$3; shift 3
  local k=$D/pki
  [ -f "$k/$n.crt" ] && return 0
  local subj="/CN=$cn"; [ -n "$org" ] && subj="/O=$org/CN=$cn"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$k/$n.key" \
    -subj "$subj" -out "$k/$n.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "$@" \
    > "$k/$n.ext"
  openssl x509 -req -in "$k/$n.csr" -CA "$k/ca.crt" -CAkey "$k/ca.key" -CAcreateserial -days 3650 \
    -extfile "$k/$n.ext" -out "$k/$n.crt" 2>/dev/null
  rm -f "$k/$n.csr" "$k/$n.ext"
}

kubeconfig() { # FILE USER CERT KEY CA
  put "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $P
  cluster:
    server: https://$CP_IP:6443
    certificate-authority: $5
users:
- name: $2
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: $P
  context:
    cluster: $P
    user: $2
current-context: $P
EOF
}

pki() {
  local k=$D/pki
  mkdir -p "$k"
  if [ ! -f "$k/ca.crt" ]; then
    log "creating the cluster CA and certificates in $k"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$k/ca.key" \
      -subj "/CN=$P-ca" -days 3650 -out "$k/ca.crt" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  fi
  [ -f "$k/sa.key" ] || { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$k/sa.key" 2>/dev/null
                          openssl pkey -in "$k/sa.key" -pubout -out "$k/sa.pub" 2>/dev/null; }
  cert apiserver kube-apiserver "" "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$SVC_IP,IP:$CP_IP,IP:127.0.0.1"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "extendedKeyUsage=clientAuth"
  cert admin kubernetes-admin system:masters "extendedKeyUsage=clientAuth"
  cert controller-manager system:kube-controller-manager "" "extendedKeyUsage=clientAuth"
  cert scheduler system:kube-scheduler "" "extendedKeyUsage=clientAuth"
  cert kube-proxy system:kube-proxy "" "extendedKeyUsage=clientAuth"
  kubeconfig "$D/admin.kubeconfig" kubernetes-admin "$k/admin.crt" "$k/admin.key" "$k/ca.crt"
  kubeconfig "$D/cp/controller-manager.kubeconfig" system:kube-controller-manager \
    "$k/controller-manager.crt" "$k/controller-manager.key" "$k/ca.crt"
  kubeconfig "$D/cp/scheduler.kubeconfig" system:kube-scheduler "$k/scheduler.crt" "$k/scheduler.key" "$k/ca.crt"
}

# ---------------------------------------------------------------------------------------------
# network

underlay() {
  if ! ip netns list | grep -qw "^$P-ul"; then
    log "creating underlay netns $P-ul ($SUB.0/24) and root link $P"0
    ip netns add $P-ul
    ip -n $P-ul link set lo up
    ip -n $P-ul link add br0 type bridge
    ip -n $P-ul link set br0 up
  fi
  if ! ip link show ${P}0 >/dev/null 2>&1; then
    ip link add ${P}0 type veth peer name host netns $P-ul
    ip -n $P-ul link set host master br0 up
    ip addr add $HOST_IP/24 dev ${P}0
    ip link set ${P}0 up
  fi
  if ! ip netns list | grep -qw "^$P-cp"; then
    ip netns add $P-cp
    ip -n $P-cp link set lo up
    ip netns exec $P-cp sysctl -qw net.ipv4.ip_forward=0
    ip link add eth0 netns $P-cp type veth peer name cp netns $P-ul
    ip -n $P-ul link set cp master br0 up
    ip -n $P-cp addr add $CP_IP/24 dev eth0
    ip -n $P-cp link set eth0 up
  fi
}

node_net() { # I
  local i=$1 ns=$P-n$1
  ip netns list | grep -qw "^$ns" && return 0
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  ip link add eth0 netns "$ns" type veth peer name n"$i" netns $P-ul
  ip -n $P-ul link set n"$i" master br0 up
  ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
  ip -n "$ns" link set eth0 up
  # Service IPs must be routable for locally generated traffic (hostNetwork pods) before kube-proxy's
  # DNAT rewrites them; there is deliberately no default route (traffic stays inside the lab).
  ip -n "$ns" route add "$SVC_CIDR" via $CP_IP dev eth0
}

# ---------------------------------------------------------------------------------------------
# control plane

control_plane() {
  local B=$1 c=$D/cp
  mkdir -p "$c/etcd"
  start etcd "$c/etcd.pid" "$c/etcd.log" ip netns exec $P-cp etcd --name $P --data-dir "$c/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster $P=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
  local k=$D/pki
  start kube-apiserver "$c/kube-apiserver.pid" "$c/kube-apiserver.log" ip netns exec $P-cp "$B/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --advertise-address=$CP_IP --bind-address=0.0.0.0 --secure-port=6443 \
    --service-cluster-ip-range="$SVC_CIDR" --allow-privileged=true \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --client-ca-file="$k/ca.crt" --tls-cert-file="$k/apiserver.crt" --tls-private-key-file="$k/apiserver.key" \
    --kubelet-client-certificate="$k/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$k/apiserver-kubelet-client.key" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$k/sa.pub" --service-account-signing-key-file="$k/sa.key" \
    --profiling=false --v=1
  WAIT_PID=$c/kube-apiserver.pid wait_for "kube-apiserver /readyz" "$DEADLINE_API" "$B/kubectl" --kubeconfig "$D/admin.kubeconfig" \
    get --raw /readyz || { tail -n 30 "$c/kube-apiserver.log" >&2; tail -n 10 "$c/etcd.log" >&2; exit 1; }
  # after /readyz: RBAC bootstrap policy exists, else the controller-manager exits on a 403
  start kube-controller-manager "$c/kube-controller-manager.pid" "$c/kube-controller-manager.log" \
    ip netns exec $P-cp "$B/kube-controller-manager" --kubeconfig="$c/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$c/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$c/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$k/sa.key" --root-ca-file="$k/ca.crt" \
    --cluster-signing-cert-file="$k/ca.crt" --cluster-signing-key-file="$k/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size="$NODE_MASK" \
    --service-cluster-ip-range="$SVC_CIDR" --configure-cloud-routes=false --profiling=false --v=1
  start kube-scheduler "$c/kube-scheduler.pid" "$c/kube-scheduler.log" ip netns exec $P-cp "$B/kube-scheduler" \
    --kubeconfig="$c/scheduler.kubeconfig" --authentication-kubeconfig="$c/scheduler.kubeconfig" \
    --authorization-kubeconfig="$c/scheduler.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false \
    --profiling=false --v=1
}

# ---------------------------------------------------------------------------------------------
# images

images() {
  local B=$1 im=$D/images
  mkdir -p "$im"
  if [ ! -f "$im/pause.tar" ]; then
    rm -rf "$im/pause-root"; mkdir -p "$im/pause-root"
    cp "$B/pause" "$im/pause-root/pause"
    python3 "$ROOT/tests/k8s/mkimage.py" "$im/pause-root" $PAUSE_IMAGE "$im/pause.tar" --entrypoint /pause >/dev/null
  fi
  if [ ! -f "$im/weft-test.tar" ]; then
    local r=$im/test-root
    rm -rf "$r"; mkdir -p "$r"/{bin,etc,proc,sys,dev,tmp,root,var/www}
    cp "$(command -v busybox)" "$r/bin/busybox"
    for a in $("$r/bin/busybox" --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
    echo 'root:x:0:' > "$r/etc/group"
    echo 'weft-test' > "$r/var/www/index.html"
    python3 "$ROOT/tests/k8s/mkimage.py" "$r" $TEST_IMAGE "$im/weft-test.tar" >/dev/null
  fi
}

import_images() { # I TAR...
  local i=$1; shift
  local t
  for t in "$@"; do
    nx "$i" ctr -n k8s.io images import "$t" >/dev/null ||
      die "import of $t into $P-n$i failed"
  done
}

# ---------------------------------------------------------------------------------------------
# nodes

holder_pid() { cat "$D/n$1/holder.pid"; }
# nx I CMD...: run CMD in node I's network and mount namespace
nx() { local i=$1; shift; nsenter -t "$(holder_pid "$i")" -m -n -- "$@"; }

# The node's mount namespace: a process ("holder") that only sleeps keeps it alive. It is created
# inside the node's netns (so /sys shows the node's links) and is a slave of the root mount namespace
# (mounts made on the node never reach the host; the host's later mounts do reach the node). Every NODE_DIRS path is bind-mounted from
# $D/nI/root/<path>, and the six kernel tunables that a kubelet "fixes" on start
# (vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops, kernel.keys.root_max*)
# are shown to it with the values it expects by bind-mounting files over /proc/sys: so the kubelet
# never changes the host's kernel settings.
node_mounts() { # I
  local i=$1 n=$D/n$1
  alive "$n/holder.pid" && return 0
  local script="set -e"
  local d c
  for d in $NODE_DIRS; do
    local p=""
    for c in ${d//\// }; do   # remember every directory created here, so that `down` removes it
      p=$p/$c
      if [ ! -d "$p" ]; then mkdir "$p"; echo "$p" >> "$D/created-mountpoints"; fi
    done
    script="$script; mount --bind '$n/root$d' '$d'"
  done
  # The pods' network namespaces (nsfs mounts the runtime makes under /run/netns) must propagate
  # into containers that mount /run/netns with HostToContainer (a CNI agent such as weft's): as
  # on a systemd host, where / is rshared, the mount is a shared one.
  script="$script; mount --make-shared /run/netns"
  # `ip netns exec` remounted /sys, which drops the cgroup mounts under it: mount the host's
  # cgroup hierarchies again (the same hierarchies, so containers land where the host sees them),
  # and a bpf filesystem of the node's own
  local src mp fs opts rest o
  if [ "$(awk '$2 == "/sys/fs/cgroup" { print $3 }' /proc/self/mounts | tail -n 1)" = cgroup2 ]; then
    script="$script; mount -t cgroup2 cgroup2 /sys/fs/cgroup"           # unified (v2-only) host
  else
    script="$script; mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup"  # v1 or hybrid host
  fi
  while read -r src mp fs opts rest; do
    case $fs in cgroup|cgroup2) ;; *) continue ;; esac
    case $mp in /sys/fs/cgroup/*) ;; *) continue ;; esac
    o=$(echo "$opts" | tr , '\n' | grep -vxE 'rw|ro|relatime|noatime|nosuid|nodev|noexec|seclabel' | paste -sd, || true)
    case $o in name=*) o=none,$o ;; esac
    script="$script; mkdir -p '$mp'; mount -t $fs ${o:+-o $o} $src '$mp'"
  done < /proc/self/mounts
  script="$script; ! [ -d /sys/fs/bpf ] || mount -t bpf bpf /sys/fs/bpf || true"
  mkdir -p "$n/sysctl"
  local kv
  for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
      kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    local f=${kv%%=*} v=${kv#*=}
    echo "$v" > "$n/sysctl/${f//\//.}"
    script="$script; mount --bind '$n/sysctl/${f//\//.}' '/proc/sys/$f'"
  done
  rm -f "$n/holder.pid"
  # `ip netns exec` itself gives the process a new mount namespace, a slave of the root one, with /sys
  # remounted for the node's netns: the holder keeps that namespace.
  setsid -f ip netns exec $P-n"$i" \
    sh -c "$script; echo \$\$ > '$n/holder.pid'; exec sleep infinity" </dev/null >>"$n/log/holder.log" 2>&1
  local k
  for k in $(seq 1 50); do alive "$n/holder.pid" && return 0; sleep 0.1; done
  cat "$n/log/holder.log" >&2
  die "could not create the mount namespace of $P-n$i"
}

node_files() { # I
  local i=$1 n=$D/n$1 name=$P-n$1 ip
  ip=$(node_ip "$i")
  local r=$n/root k=$D/pki d
  for d in $NODE_DIRS; do mkdir -p "$r$d"; done
  mkdir -p "$r/etc/kubernetes/pki" "$r/etc/containerd"
  cert "node-$i" "system:node:$name" system:nodes "extendedKeyUsage=clientAuth"
  put "$r/etc/kubernetes/pki/ca.crt" < "$k/ca.crt"
  put "$r/etc/kubernetes/pki/kubelet-client.crt" < "$k/node-$i.crt"
  put "$r/etc/kubernetes/pki/kubelet-client.key" < "$k/node-$i.key"
  put "$r/etc/kubernetes/pki/kube-proxy.crt" < "$k/kube-proxy.crt"
  put "$r/etc/kubernetes/pki/kube-proxy.key" < "$k/kube-proxy.key"
  kubeconfig "$r/etc/kubernetes/kubelet.conf" "system:node:$name" /etc/kubernetes/pki/kubelet-client.crt \
    /etc/kubernetes/pki/kubelet-client.key /etc/kubernetes/pki/ca.crt
  kubeconfig "$r/etc/kubernetes/kube-proxy.conf" system:kube-proxy /etc/kubernetes/pki/kube-proxy.crt \
    /etc/kubernetes/pki/kube-proxy.key /etc/kubernetes/pki/ca.crt
  # the loopback plugin is needed by containerd's CRI for every pod; the pod network plugin is not
  # installed here (a CNI installer, or tests/k8s/smoke.sh, puts it into /opt/cni/bin + /etc/cni/net.d)
  for p in loopback portmap; do
    [ -e "$r/opt/cni/bin/$p" ] || cp /usr/lib/cni/$p "$r/opt/cni/bin/$p"
  done
  put "$r/etc/containerd/config.toml" <<EOF
# containerd of lab node $name (paths are the node's own through its mount namespace)
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "/run/containerd/containerd.sock"
[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # no CAP_SYS_RESOURCE on these machines: the default sandbox oom_score_adj (-998) makes runc fail
  # with "can't get final child's PID from pipe: EOF"; this clamps it to containerd's own
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
  put "$r/etc/kubernetes/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /etc/kubernetes/pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
# cgroup v1 here, no systemd; never move or limit the caller's cgroup: no QoS/node-allocatable
# cgroups, no kubelet/system/runtime cgroups
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: ["none"]
oomScoreAdj: 0
failSwapOn: false
clusterDomain: cluster.local
rotateCertificates: false
serverTLSBootstrap: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
maxPods: 110
EOF
  put "$r/etc/kubernetes/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $name
clusterCIDR: $CLUSTER_CIDR
clientConnection: {kubeconfig: /etc/kubernetes/kube-proxy.conf}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
nodePortAddresses: ["primary"]
oomScoreAdj: 0
# nf_conntrack_max is global (read-only outside the root netns): leave the conntrack sysctls alone
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

node_up() { # BIN I
  local B=$1 i=$2 n=$D/n$2 name=$P-n$2
  mkdir -p "$n/log"
  node_net "$i"
  node_files "$i"
  node_mounts "$i"
  local H; H=$(holder_pid "$i")
  start "containerd ($name)" "$n/containerd.pid" "$n/log/containerd.log" \
    nsenter -t "$H" -m -n -- containerd --config /etc/containerd/config.toml
  wait_for "containerd socket of $name" 30 test -S "$n/root/run/containerd/containerd.sock" ||
    { tail -n 20 "$n/log/containerd.log" >&2; exit 1; }
  wait_for "containerd of $name" 30 nx "$i" ctr version ||
    { tail -n 20 "$n/log/containerd.log" >&2; exit 1; }
  local extra=()
  [ -d "$ROOT/target/images" ] && while IFS= read -r t; do extra+=("$t"); done \
    < <(find "$ROOT/target/images" -maxdepth 1 -name '*.tar' | sort)
  local want=("$D/images/pause.tar" "$D/images/weft-test.tar" "${extra[@]}")
  if [ ! -f "$n/imported" ] || [ "$(sha256sum "${want[@]}" | sha256sum)" != "$(cat "$n/imported")" ]; then
    log "importing ${#want[@]} image archive(s) into $name"
    import_images "$i" "${want[@]}"
    sha256sum "${want[@]}" | sha256sum > "$n/imported"
  fi
  # a kubelet registers its Node once per start: after `kubectl delete node`, restart it to re-add it
  if alive "$n/kubelet.pid" &&
      ! "$B/kubectl" --kubeconfig "$D/admin.kubeconfig" get node "$name" >/dev/null 2>&1; then
    log "$name is not registered (deleted?): restarting its kubelet"
    stop_pidfiles "$n/kubelet.pid"
  fi
  start "kubelet ($name)" "$n/kubelet.pid" "$n/log/kubelet.log" \
    nsenter -t "$H" -m -n -- "$B/kubelet" --config=/etc/kubernetes/kubelet.yaml \
    --kubeconfig=/etc/kubernetes/kubelet.conf --hostname-override="$name" --node-ip="$(node_ip "$i")" --v=1
}

# ---------------------------------------------------------------------------------------------

cmd_up() {
  local N=2
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) N=$2; shift 2 ;;
      --nodes=*) N=${1#*=}; shift ;;
      *) die "unknown argument $1 (usage: $0 up [--nodes N])" ;;
    esac
  done
  [[ $N =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 50 ] || die "--nodes must be 1..50"
  need_tools
  local B
  B=$("$ROOT/scripts/k8s-build.sh" | tail -n 1)
  [ -x "$B/kubelet" ] || die "no binaries in '$B'"
  mkdir -p "$D/cp"
  underlay
  pki
  control_plane "$B"
  images "$B"
  # containerd puts containers in /k8s.io/<id> of every cgroup hierarchy: remember whether that
  # parent is ours, so that `down` removes it again
  compgen -G "/sys/fs/cgroup/*/k8s.io" >/dev/null || touch "$D/created-cgroup-parent"
  local i
  for i in $(seq 1 "$N"); do node_up "$B" "$i"; done
  local kc=("$B/kubectl" --kubeconfig "$D/admin.kubeconfig")
  for i in $(seq 1 "$N"); do
    WAIT_PID=$D/n$i/kubelet.pid wait_for "node $P-n$i to register" "$DEADLINE_NODES" "${kc[@]}" get node "$P-n$i" ||
      { tail -n 30 "$D/n$i/log/kubelet.log" >&2; exit 1; }
    # kube-proxy reads its node's IP from the Node object: start it once the node exists
    start "kube-proxy ($P-n$i)" "$D/n$i/kube-proxy.pid" "$D/n$i/log/kube-proxy.log" \
      nsenter -t "$(holder_pid "$i")" -m -n -- "$B/kube-proxy" --config=/etc/kubernetes/kube-proxy.yaml --v=1
  done
  sleep 2
  local f dead=""
  for f in "$D"/cp/*.pid "$D"/n*/*.pid; do alive "$f" || dead="$dead ${f#"$D"/}"; done
  [ -z "$dead" ] || die "not running:$dead (logs: $D/cp/*.log, $D/n*/log/*.log)"
  "${kc[@]}" get nodes -o wide >&2
  log "up: $N node(s). Nodes stay NotReady until a CNI plugin and its config are installed on them."
  log "use it with:  eval \"\$($0 env)\"; kubectl get nodes"
}

# kill PID and all its descendants (children first), by pid
kill_tree() { # SIGNAL PID
  local c
  for c in $(pgrep -P "$2" 2>/dev/null); do kill_tree "$1" "$c"; done
  kill "-$1" "$2" 2>/dev/null || true
}

stop_pidfiles() { # PIDFILE...: SIGTERM all, wait up to 5 s for them together, then SIGKILL (with children)
  local f pids=""
  for f in "$@"; do
    [ -f "$f" ] || continue
    kill -0 "$(cat "$f")" 2>/dev/null && pids="$pids $(cat "$f")"
  done
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null || true
    local k p left
    for k in $(seq 1 50); do
      left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
      [ -n "$left" ] || break
      sleep 0.1
    done
    for p in $left; do kill_tree KILL "$p"; done
  fi
  rm -f "$@"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local n i c ids="" agents=()
  for n in "$D"/n*; do [ -d "$n" ] && agents+=("$n/kubelet.pid" "$n/kube-proxy.pid"); done
  [ ${#agents[@]} = 0 ] || stop_pidfiles "${agents[@]}"
  for n in "$D"/n*; do
    [ -d "$n" ] || continue
    i=${n##*/n}
    if alive "$n/holder.pid" && alive "$n/containerd.pid"; then
      # end the pods' tasks through containerd, so that the shims remove their cgroups
      for c in $(nx "$i" ctr -n k8s.io tasks ls -q 2>/dev/null); do
        ids="$ids $c"
        nx "$i" ctr -n k8s.io tasks kill -s SIGKILL -a "$c" >/dev/null 2>&1 || true
      done
      for c in $(nx "$i" ctr -n k8s.io tasks ls -q 2>/dev/null); do
        nx "$i" timeout 10 ctr -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
      done
    fi
  done
  local daemons=()
  for n in "$D"/n*; do [ -d "$n" ] && daemons+=("$n/containerd.pid"); done
  daemons+=("$D/cp/kube-scheduler.pid" "$D/cp/kube-controller-manager.pid" "$D/cp/kube-apiserver.pid")
  stop_pidfiles "${daemons[@]}"
  stop_pidfiles "$D/cp/etcd.pid"
  # whatever is left in the lab's netns (shims, holders, their children), children first
  local ns pid
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill_tree KILL "$pid"; done
  done
  for n in "$D"/n*; do rm -f "$n/holder.pid"; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
  ip link del ${P}0 2>/dev/null || true
  # empty cgroups of killed containers (containerd puts them in /k8s.io/<id> of each hierarchy)
  local id cg
  for id in $ids; do
    for cg in /sys/fs/cgroup/*/k8s.io/"$id"; do [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true; done
  done
  if [ -f "$D/created-cgroup-parent" ]; then
    for cg in /sys/fs/cgroup/*/k8s.io; do [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true; done
  fi
  if [ -f "$D/created-mountpoints" ]; then
    sort -ru "$D/created-mountpoints" | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  fi
  if [ -d "$D" ]; then
    # nothing of ours may still be mounted in the root mount namespace
    ! grep -q " $D" /proc/self/mounts || die "still mounted under $D: $(grep " $D" /proc/self/mounts)"
    rm -rf "$D"
  fi
  log "down"
}

cmd_env() {
  echo "export KUBECONFIG=$D/admin.kubeconfig"
  echo "export PATH=$(bindir):\$PATH"
}

cmd_status() {
  local f
  for f in "$D"/cp/*.pid "$D"/n*/*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then echo "running  $(cat "$f")  ${f#"$D"/}"; else echo "DEAD          ${f#"$D"/}"; fi
  done
  [ -f "$D/admin.kubeconfig" ] && "$(bindir)/kubectl" --kubeconfig "$D/admin.kubeconfig" get nodes -o wide || true
}

main() {
  case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    exec) shift; [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."; n=${1#"$P"-n}; shift; nx "$n" "$@" ;;
    import) shift; [ $# -ge 2 ] || die "usage: $0 import NODE|all TAR..."
      sel=$1; shift
      for n in "$D"/n*; do
        i=${n##*/n}
        if [ "$sel" = all ] || [ "$sel" = "$P-n$i" ]; then import_images "$i" "$@"; fi
      done ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
}

# sourcing the script (for debugging) only defines the functions
[ "${BASH_SOURCE[0]}" != "$0" ] || main "$@"
