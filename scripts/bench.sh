#!/bin/sh
# Benchmarks that compare weft with a reference measured in the same run, and print ratios.
#   ./scripts/bench.sh [cni|dp|mesh|ipam|dns|docker|all]      (as root; results go to stdout)
set -eu
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_packages $TEST_PACKAGES
need_rust
cargo build --locked --release --quiet --workspace --bins
what=${1:-all}
case $what in
  cni|dp|mesh|ipam|dns|docker|all) ;;
  *) echo "usage: $0 [cni|dp|mesh|ipam|dns|docker|all]" >&2; exit 2 ;;
esac
if [ "$what" = cni ] || [ "$what" = all ]; then ./target/release/cni-bench; fi
if [ "$what" = dp ] || [ "$what" = all ]; then ./target/release/dp-bench; fi
if [ "$what" = mesh ] || [ "$what" = all ]; then ./target/release/mesh-sim; fi
if [ "$what" = ipam ] || [ "$what" = all ]; then ./target/release/ipam-bench; fi
if [ "$what" = dns ] || [ "$what" = all ]; then ./target/release/dns-bench; fi
if [ "$what" = docker ] || [ "$what" = all ]; then
  cargo test --locked --release --quiet -p weft-e2e --test docker -- --ignored --nocapture docker_bench
fi
