#!/usr/bin/env bash
# Three Kith nodes in network namespaces: A and C each reach R, but not each other (R
# does not forward IP). C pairs with A through R's relay (circuit relay v2; hole punching
# is tried and cannot succeed here), and A's request for Gemma runs on C, relayed.
# Needs root (ip netns) and the pulled models.
#
#   sudo KITH_HOME=~/.local/share/kith tests/netns-relay.sh [path/to/kith]
source "$(dirname "$0")/netns-lib.sh"

id=$$
ns_a=kith-ra-$id ns_c=kith-rc-$id ns_r=kith-rr-$id
for ns in "$ns_a" "$ns_c" "$ns_r"; do new_ns "$ns"; done
link "$ns_a" 10.78.1.2 "$ns_r" 10.78.1.1 "a$id"
link "$ns_c" 10.78.2.2 "$ns_r" 10.78.2.1 "c$id"
if ip -n "$ns_a" route get 10.78.2.2 >/dev/null 2>&1; then
  echo "A can reach C directly: the test would prove nothing" >&2; exit 1
fi

serve "$ns_r" relay smollm2-135m /ip4/0.0.0.0/tcp/4790 KITH_NO_MDNS=1
serve "$ns_a" alice smollm2-135m /ip4/0.0.0.0/tcp/4790 KITH_NO_MDNS=1
serve "$ns_c" carol gemma3-270m /ip4/0.0.0.0/tcp/4790 KITH_NO_MDNS=1

pair_through_relay
listed=$(peers "$ns_a" alice list)
echo "$listed"
grep -A0 '^carol' <<<"$listed" | grep -q 'connected (relayed' || { echo "carol is not reached through the relay" >&2; exit 1; }
answer=$(in_ns "$ns_a" "$work/alice" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 8 --stats "The sky is" 2>&1)
echo "$answer"
grep -q "ran on carol (through the node at" <<<"$answer" || { echo "the answer did not run on carol" >&2; exit 1; }
echo "netns-relay: paired and offloaded through a friend's relay"
