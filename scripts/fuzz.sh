#!/bin/sh
# Coverage-guided fuzzing (cargo-fuzz, needs a nightly toolchain) of the decoders that read
# untrusted bytes, each under libFuzzer's 256 MiB RSS cap (and no single allocation above it).
# The test suite runs the same entry points for a bounded time on stable, under a 256 MiB
# address-space cap (agent/tests/fuzz_bounded.rs).
#   ./scripts/fuzz.sh [SECONDS_PER_TARGET]
set -eu
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in mesh_frames mesh_handshake sleeve_reassembly dns_gossip mac_gossip ipam_gossip cni_config; do
  echo "==> fuzzing $t for ${secs}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=256 -malloc_limit_mb=256
done
