#!/bin/sh
# Builds the Kubernetes binaries of the test lab from source (Go modules, pinned in tests/k8s/go.mod
# and tests/k8s/helm/go.mod): kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl, the lab's pause binary (one `go build`), and helm (a second one: Helm v4
# needs newer k8s.io libraries than the pinned release).
#
#   scripts/k8s-build.sh          build if needed; prints the bin dir on the last line of stdout
#   scripts/k8s-build.sh --dir    only print the bin dir (it may not exist yet)
#
# Binaries are cached outside the work tree, keyed by a hash of the module files, the pause source
# and $RECIPE below: $WEFT_K8S_CACHE (default /var/cache/weft-k8s)/<key>/bin. A fresh clone on the
# same machine reuses them (seconds); a cold build takes ~11 minutes on 2 cores. Go's own caches
# (GOMODCACHE, GOCACHE) make a rebuild after a small change fast too.
# Heavy steps run under `flock /tmp/weft-build.lock nice -n 10` so they never overlap other builds
# that take the same lock (cargo in scripts/test.sh).
# Exit codes: 0 ok, 3 Go missing or too old, 4 module proxy unreachable, 5 build failed.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MOD=$ROOT/tests/k8s
CACHE=${WEFT_K8S_CACHE:-/var/cache/weft-k8s}
LOCK=${WEFT_BUILD_LOCK:-/tmp/weft-build.lock}
GO_MIN=1.25

K8S_VERSION=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$MOD/go.mod")
HELM_VERSION=$(awk '$1 == "require" && $2 == "helm.sh/helm/v4" { print $3 }' "$MOD/helm/go.mod")
# Bump RECIPE whenever the way the binaries are built changes (flags, ldflags, package list below):
# it is part of the cache key, with the module files and the pause source.
RECIPE="1: CGO_ENABLED=0 -trimpath -s -w; k8s version stamps; helm version stamps; 6 k8s cmds + pause + helm"
KEY=$( (cat "$MOD/go.mod" "$MOD/go.sum" "$MOD/helm/go.mod" "$MOD/helm/go.sum" "$MOD/cmd/pause/main.go"
  echo "$RECIPE") | sha256sum | cut -c1-16)
DIR=$CACHE/$KEY
BIN=$DIR/bin
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl pause helm"

log() { echo "k8s-build: $*" >&2; }
die() { code=$1; shift; echo "k8s-build: error: $*" >&2; exit "$code"; }

is_built() {
  for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done
}

if [ "${1:-}" = "--dir" ]; then echo "$BIN"; exit 0; fi
if is_built; then
  log "Kubernetes $K8S_VERSION + helm $HELM_VERSION: cached in $BIN"
  echo "$BIN"; exit 0
fi

# --- prerequisites -------------------------------------------------------------------------------
if ! command -v go >/dev/null 2>&1; then
  [ -x /usr/local/go/bin/go ] && PATH=/usr/local/go/bin:$PATH || \
    die 3 "Go >= $GO_MIN is needed to build Kubernetes $K8S_VERSION from source, and 'go' is not on PATH.
  Install Go >= $GO_MIN (the official release in /usr/local/go, or a distribution package if it is new
  enough) and run this again."
fi
GOV=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$GO_MIN" "$GOV" | sort -V | head -n1)" != "$GO_MIN" ]; then
  die 3 "Go $GOV is too old; Kubernetes $K8S_VERSION needs Go >= $GO_MIN (helm $HELM_VERSION: its go.mod's)."
fi
command -v flock >/dev/null 2>&1 || die 3 "flock (util-linux) is needed"
# Go keeps its caches under $HOME; CI environments may not set it
if [ -z "${HOME:-}" ]; then HOME=$(getent passwd "$(id -u)" | cut -d: -f6); export HOME; fi
export CGO_ENABLED=0 GOFLAGS=-mod=readonly

log "downloading modules (proxy: $(go env GOPROXY))"
mkdir -p "$CACHE"
for m in "$MOD" "$MOD/helm"; do
  if ! (cd "$m" && go mod download) >"$CACHE/download.log" 2>&1; then
    tail -n 20 "$CACHE/download.log" >&2
    die 4 "cannot download the Go modules of $m from the Go module proxy ($(go env GOPROXY)).
  Check network access to it (or point GOPROXY at a reachable proxy)."
  fi
done
rm -f "$CACHE/download.log"

# --- build ---------------------------------------------------------------------------------------
mkdir -p "$DIR"
TMP=$DIR/bin.tmp.$$
rm -rf "$TMP"; mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
# the release time of the pinned module stands in for the build date (reproducible)
DATE=$(cd "$MOD" && go list -m -json k8s.io/kubernetes 2>/dev/null | sed -n 's/.*"Time": "\(.*\)".*/\1/p' | head -n1)
[ -n "$DATE" ] || DATE=1970-01-01T00:00:00Z
MAJOR=$(echo "$K8S_VERSION" | sed 's/^v\([0-9]*\)\..*/\1/')
MINOR=$(echo "$K8S_VERSION" | sed 's/^v[0-9]*\.\([0-9]*\)\..*/\1/')
LDF="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$MAJOR -X $pkg.gitMinor=$MINOR"
  LDF="$LDF -X $pkg.gitTreeState=clean -X $pkg.buildDate=$DATE -X $pkg.gitCommit=module-$K8S_VERSION"
done
START=$(date +%s)
log "building Kubernetes $K8S_VERSION (6 commands + pause) into $BIN; cold: ~6 min on 2 cores, then helm ~5 min"
(cd "$MOD" && flock "$LOCK" nice -n 10 go build -trimpath -ldflags "$LDF" -o "$TMP/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl ./cmd/pause) ||
  die 5 "go build of Kubernetes $K8S_VERSION failed"
log "building helm $HELM_VERSION"
HLDF="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.metadata="
HLDF="$HLDF -X helm.sh/helm/v4/internal/version.gitCommit=module-$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
(cd "$MOD/helm" && flock "$LOCK" nice -n 10 go build -trimpath -ldflags "$HLDF" -o "$TMP/" helm.sh/helm/v4/cmd/helm) ||
  die 5 "go build of helm $HELM_VERSION failed"
rm -rf "$BIN"; mv "$TMP" "$BIN"
log "built in $(( $(date +%s) - START )) s: $(cd "$BIN" && echo *)"
echo "$BIN"
