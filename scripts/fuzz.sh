#!/bin/sh
# Coverage-guided fuzzing (cargo-fuzz, needs a nightly toolchain) of the decoders that read
# untrusted bytes. The test suite runs the same entry points for a bounded time on stable.
#   ./scripts/fuzz.sh [SECONDS_PER_TARGET]
set -eu
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in mesh_frames mesh_handshake cni_config; do
  echo "==> fuzzing $t for ${secs}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs"
done
