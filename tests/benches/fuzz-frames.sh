#!/usr/bin/env bash
# Fuzzes the mesh's frame decoders and invite-code parser for a bounded time (default
# 60 s) with cargo-fuzz (libFuzzer, nightly), starting from the kept corpus; new inputs
# that reach new code are added to it. Not part of CI: run it by hand or on a schedule.
#
#   tests/benches/fuzz-frames.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../../crates/mesh"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz run frames fuzz/corpus/frames -- -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=512
