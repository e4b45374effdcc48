#!/usr/bin/env bash
# Kith's whole test suite: pulls the models the tests run on (once; they are cached in
# KITH_HOME), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v age >/dev/null || { echo "the memory tests need the age tool (Debian: apt-get install age)" >&2; exit 1; }
for tool in dbus-run-session gnome-keyring-daemon; do
  command -v "$tool" >/dev/null || {
    echo "the OS-keyring test needs $tool (Debian: apt-get install dbus gnome-keyring)" >&2; exit 1; }
done

for model in smollm2-135m gemma3-270m minilm-l6; do
  cargo run --quiet -p kith-cli -- models pull "$model" >/dev/null
done
cargo test --workspace "$@"
