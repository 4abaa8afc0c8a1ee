#!/bin/sh
# The whole test suite: formatting, lints, unit and property tests, the end-to-end tests in
# network namespaces with real agents, containerd's CRI and podman, and a real Kubernetes cluster
# built from source (the first run on a machine compiles it: ~11 min), on which weft is installed with
# kubectl and helm (tests/k8s/weft.sh), and the agent's map page in headless chromium. Installs
# what it needs.
# Run as root on a Debian/Ubuntu machine:   ./scripts/test.sh
set -eu
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_packages $TEST_PACKAGES
need_node
need_rust
export CARGO_TERM_COLOR=never RUST_BACKTRACE=1

echo "==> browser test packages (playwright-core, driving the system's chromium)"
npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> build (release)"
cargo build --locked --release --workspace --bins
echo "==> tests (unit, property, end-to-end)"
cargo test --locked --release --workspace -- --test-threads=2 --skip a_hundred_thousand_operations \
  --skip capped_fuzz_ --skip five_minutes_of_mixed_load
echo "==> bounded fuzz of the decoders of remote input, each under a 256 MiB address-space cap (~40 s)"
cargo test --locked --release -p weft --test fuzz_bounded -- --nocapture --test-threads=2
echo "==> map page in headless chromium: a partitioned, encrypted 3-host lab, and a simulated 1000-peer mesh"
cargo test --locked --release -p weft-e2e --test ui -- --ignored --nocapture --test-threads=1
echo "==> soak: 3 hosts, 5 minutes of CNI ADD/DEL, DNS and TCP load, one agent SIGKILLed every minute"
cargo test --locked --release -p weft-e2e --test soak -- --nocapture
echo "==> IP allocation simulation (long; prints its operation count)"
cargo test --locked --release -p weft --lib a_hundred_thousand_operations -- --nocapture
echo "==> Kubernetes lab (a real cluster built from source; the first run on a machine builds it)"
tests/k8s/smoke.sh
echo "==> Helm chart: helm lint, and manifests/weft.yaml is the chart's output"
scripts/manifests.sh --check
echo "==> Kubernetes journey: weft installed by kubectl and helm on a 3-node cluster (tests/k8s/weft.sh)"
tests/k8s/weft.sh
echo "==> NetworkPolicy conformance: the 26 scenarios' matrices on a 3-node cluster against weft's evaluator"
cargo test --locked --release -p weft-e2e --test netpol -- --ignored --nocapture
echo "==> all tests passed"
