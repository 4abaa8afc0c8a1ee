#!/bin/sh
# Benchmarks that compare weft with a reference measured in the same run, and print ratios.
#   ./scripts/bench.sh [cni|all]      (as root; results go to stdout)
set -eu
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_packages $TEST_PACKAGES
need_rust
cargo build --locked --release --quiet --workspace --bins
what=${1:-all}
case $what in
  cni|all) ./target/release/cni-bench ;;
  *) echo "usage: $0 [cni|all]" >&2; exit 2 ;;
esac
