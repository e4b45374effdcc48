#!/usr/bin/env bash
# Kith's whole test suite: pulls the models the tests run on (once; they are cached in
# KITH_HOME), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v age >/dev/null || { echo "the memory tests need the age tool (Debian: apt-get install age)" >&2; exit 1; }
for tool in dbus-run-session gnome-keyring-daemon node npm; do
  command -v "$tool" >/dev/null || {
    echo "the tests need $tool (Debian: apt-get install dbus gnome-keyring nodejs npm)" >&2; exit 1; }
done

for model in smollm2-135m gemma3-270m minilm-l6; do
  cargo run --quiet -p kith-cli -- models pull "$model" >/dev/null
done
# The official OpenAI SDKs (Python and JS) are run against a live node by tests/e2e.
sdk=target/test-sdks
if ! "$sdk/py/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$sdk/py"
  "$sdk/py/bin/pip" install --quiet "openai==3.57.0"
fi
if [ ! -d "$sdk/js/node_modules/openai" ]; then
  mkdir -p "$sdk/js"
  npm install --prefix "$sdk/js" --silent --no-audit --no-fund "openai@7.57.0"
fi
export KITH_TEST_PYTHON="$PWD/$sdk/py/bin/python" KITH_TEST_JS="$PWD/$sdk/js"

cargo test --workspace "$@"

# Nodes in separate network namespaces pair and offload: directly, through a friend's
# relay, and hole-punched through two NATs (needs root for ip netns, and iptables).
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && ip netns add kith-probe-$$ 2>/dev/null; then
  ip netns del kith-probe-$$
  tests/netns.sh target/debug/kith
  tests/netns-relay.sh target/debug/kith
  tests/netns-nat.sh target/debug/kith
else
  echo "skipping tests/netns*.sh: they need root and ip netns (run them with sudo)" >&2
fi
