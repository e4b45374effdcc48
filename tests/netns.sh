#!/usr/bin/env bash
# Two Kith nodes in separate network namespaces, joined by a veth pair (no loopback
# shortcut): B serves Gemma, A serves SmolLM2. They pair through an invite and A's
# request for Gemma runs on B. Then B restarts on another port: the address A saved is
# stale, and B finds A again with mDNS (which only ever looks for trusted peers), so A's
# next request runs on B again. Needs root (ip netns) and the pulled models.
#
#   sudo KITH_HOME=~/.local/share/kith tests/netns.sh [path/to/kith]
set -euo pipefail
cd "$(dirname "$0")/.."
kith=${1:-target/debug/kith}
[ -x "$kith" ] || cargo build --quiet -p kith-cli
kith=$(realpath "$kith")
models=$(dirname "$(dirname "$("$kith" models path smollm2-135m)")")
"$kith" models path gemma3-270m >/dev/null

suffix=$$
ns_a=kith-a-$suffix ns_b=kith-b-$suffix
work=$(mktemp -d)
cleanup() {
  for pid in "${pids[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}
pids=()
trap cleanup EXIT

ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "va$suffix" type veth peer name "vb$suffix"
ip link set "va$suffix" netns "$ns_a"
ip link set "vb$suffix" netns "$ns_b"
ip -n "$ns_a" addr add 10.77.0.1/24 dev "va$suffix"
ip -n "$ns_b" addr add 10.77.0.2/24 dev "vb$suffix"
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set "va$suffix" up
ip -n "$ns_b" link set "vb$suffix" up

in_ns() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" env KITH_HOME="$home" "$@"; }
for name in a b; do
  mkdir -p "$work/$name"
  ln -s "$models" "$work/$name/models"
done

start() { # ns home name ip model [port]
  [ -e "$2/vault" ] || KITH_HOME="$2" KITH_PASSPHRASE="netns $3" "$kith" vault init >/dev/null 2>&1
  # Not through in_ns: a backgrounded function is a subshell, and $! must be kith itself
  # (ip netns exec and env exec it) for the kills below to reach it.
  ip netns exec "$1" env KITH_HOME="$2" KITH_PASSPHRASE="netns $3" KITH_NODE_NAME="$3" KITH_LOG=kith_mesh=info \
    "$kith" serve --model "$5" --listen 127.0.0.1:0 --mesh-listen "/ip4/$4/tcp/${6:-4790}" >"$2/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q '^Mesh: device id' "$2/serve.log" && return 0
    sleep 0.2
  done
  cat "$2/serve.log" >&2
  return 1
}
start "$ns_b" "$work/b" bob 10.77.0.2 gemma3-270m
start "$ns_a" "$work/a" alice 10.77.0.1 smollm2-135m

code=$(in_ns "$ns_b" "$work/b" "$kith" peers invite --hours 1 2>/dev/null)
case "$code" in kith1*) ;; *) echo "no invite code: $code" >&2; exit 1 ;; esac
in_ns "$ns_a" "$work/a" "$kith" peers accept "$code"
in_ns "$ns_a" "$work/a" "$kith" peers list
answer=$(in_ns "$ns_a" "$work/a" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 8 --stats "The sky is" 2>&1)
echo "$answer"
grep -q "ran on bob (through the node at" <<<"$answer" || { echo "the answer did not run on bob" >&2; exit 1; }
usage=$(in_ns "$ns_b" "$work/b" "$kith" peers usage)
echo "$usage"
grep -q "1 requests" <<<"$usage" || { echo "bob's ledger does not show alice's request" >&2; exit 1; }

# B moves to another port; A only knows the old one. mDNS brings them together again.
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
start "$ns_b" "$work/b" bob 10.77.0.2 gemma3-270m 4791
for _ in $(seq 1 50); do
  in_ns "$ns_a" "$work/a" "$kith" peers list | grep -q '^bob .* connected' && break
  sleep 0.2
done
again=$(in_ns "$ns_a" "$work/a" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 4 --stats "The sea is" 2>&1) || true
echo "$again"
grep -q "ran on bob (through the node at" <<<"$again" || { echo "bob was not found again after moving" >&2; exit 1; }
echo "netns: paired across namespaces, offloaded, and found again with mDNS"
