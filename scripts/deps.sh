# Installs what weft's demo and tests need on Debian/Ubuntu (sourced by demo.sh and test.sh).
# Only missing packages are installed; a machine that has them all is left alone.

DEMO_PACKAGES="iproute2 nftables iputils-ping ca-certificates"
TEST_PACKAGES="$DEMO_PACKAGES iptables containernetworking-plugins containerd runc podman busybox-static
  iperf3 tcpdump dnsperf knot-dnsutils dnsmasq-base bind9-dnsutils python3 netcat-openbsd procps
  etcd-server openssl conntrack util-linux binutils docker.io chromium"

need_root() {
  [ "$(id -u)" = 0 ] || { echo "$0: run as root (weft creates network namespaces, bridges and nftables tables)" >&2; exit 1; }
}

install_packages() {
  missing=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null || { echo "$0: please install:$missing" >&2; exit 1; }
  echo "==> installing:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# Node.js (with npm) for the browser tests of the map page (tests/ui); Debian's if missing.
need_node() {
  command -v node >/dev/null && command -v npm >/dev/null && return 0
  install_packages nodejs npm
}

need_rust() {
  command -v cargo >/dev/null && return 0
  [ -x "$HOME/.cargo/bin/cargo" ] && { PATH="$HOME/.cargo/bin:$PATH"; export PATH; return 0; }
  echo "==> installing Rust (rustup)"
  if command -v curl >/dev/null && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt >/dev/null; then
    PATH="$HOME/.cargo/bin:$PATH"; export PATH
  else
    echo "$0: cargo not found and rustup could not be installed; install Rust >= 1.85 (https://rustup.rs)" >&2
    exit 1
  fi
}
