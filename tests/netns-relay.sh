#!/usr/bin/env bash
# Three Kith nodes in network namespaces: A and C each reach R, but not each other (R
# does not forward IP). C pairs with A through R's relay (circuit relay v2; hole punching
# is tried and cannot succeed here), and A's request for Gemma runs on C, relayed.
# Needs root (ip netns) and the pulled models.
#
#   sudo KITH_HOME=~/.local/share/kith tests/netns-relay.sh [path/to/kith]
set -euo pipefail
cd "$(dirname "$0")/.."
kith=${1:-target/debug/kith}
[ -x "$kith" ] || cargo build --quiet -p kith-cli
kith=$(realpath "$kith")
models=$(dirname "$(dirname "$("$kith" models path smollm2-135m)")")
"$kith" models path gemma3-270m >/dev/null

id=$$
ns_a=kith-ra-$id ns_c=kith-rc-$id ns_r=kith-rr-$id
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$ns_a" "$ns_c" "$ns_r"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

for ns in "$ns_a" "$ns_c" "$ns_r"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
link() { # ns_x ip_x ns_r ip_r name
  ip link add "x$5" type veth peer name "r$5"
  ip link set "x$5" netns "$1"
  ip link set "r$5" netns "$3"
  ip -n "$1" addr add "$2/24" dev "x$5"
  ip -n "$3" addr add "$4/24" dev "r$5"
  ip -n "$1" link set "x$5" up
  ip -n "$3" link set "r$5" up
}
link "$ns_a" 10.78.1.2 "$ns_r" 10.78.1.1 "a$id"
link "$ns_c" 10.78.2.2 "$ns_r" 10.78.2.1 "c$id"
if ip -n "$ns_a" route get 10.78.2.2 >/dev/null 2>&1; then
  echo "A can reach C directly: the test would prove nothing" >&2; exit 1
fi

in_ns() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" env KITH_HOME="$home" "$@"; }
start() { # ns name model
  local home="$work/$2"
  mkdir -p "$home"
  ln -s "$models" "$home/models"
  KITH_HOME="$home" KITH_PASSPHRASE="relay $2" "$kith" vault init >/dev/null 2>&1
  # Not through in_ns: a backgrounded function is a subshell, and $! must be kith itself
  # (ip netns exec and env exec it) for the cleanup to reach it.
  ip netns exec "$1" env KITH_HOME="$home" KITH_PASSPHRASE="relay $2" KITH_NODE_NAME="$2" KITH_NO_MDNS=1 KITH_LOG=kith_mesh=info \
    "$kith" serve --model "$3" --listen 127.0.0.1:0 --mesh-listen /ip4/0.0.0.0/tcp/4790 >"$home/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q '^Mesh: device id' "$home/serve.log" && return 0
    sleep 0.2
  done
  cat "$home/serve.log" >&2
  return 1
}
peers() { local ns=$1 name=$2; shift 2; in_ns "$ns" "$work/$name" "$kith" peers "$@"; }
start "$ns_r" relay smollm2-135m
start "$ns_a" alice smollm2-135m
start "$ns_c" carol gemma3-270m

peers "$ns_a" alice accept "$(peers "$ns_r" relay invite 2>/dev/null)"
peers "$ns_c" carol accept "$(peers "$ns_r" relay invite 2>/dev/null)"
# C holds a slot on R once it has identified R as a relay.
for _ in $(seq 1 50); do
  grep -q 'relay slot reserved' "$work/carol/serve.log" && break
  sleep 0.2
done
grep -q 'relay slot reserved' "$work/carol/serve.log" || { cat "$work/carol/serve.log" >&2; echo "no relay slot" >&2; exit 1; }
code=$(peers "$ns_c" carol invite)
peers "$ns_a" alice accept "$code"
listed=$(peers "$ns_a" alice list)
echo "$listed"
grep -A0 '^carol' <<<"$listed" | grep -q 'connected (relayed' || { echo "carol is not reached through the relay" >&2; exit 1; }
answer=$(in_ns "$ns_a" "$work/alice" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 8 --stats "The sky is" 2>&1)
echo "$answer"
grep -q "ran on carol (through the node at" <<<"$answer" || { echo "the answer did not run on carol" >&2; exit 1; }
echo "netns-relay: paired and offloaded through a friend's relay"
