#!/usr/bin/env bash
# Two Kith nodes in separate network namespaces, joined by a veth pair (no loopback
# shortcut): B serves Gemma, A serves SmolLM2. They pair through an invite and A's
# request for Gemma runs on B. Then B restarts on another port without mDNS: A's saved
# address of B is stale, B's of A is not, and A's next request runs on B again. Then both
# restart on new ports: every saved address is stale, and mDNS (which only ever looks for
# trusted peers) finds them. Needs root (ip netns) and the pulled models.
#
#   sudo KITH_HOME=~/.local/share/kith tests/netns.sh [path/to/kith]
source "$(dirname "$0")/netns-lib.sh"

id=$$
ns_a=kith-a-$id ns_b=kith-b-$id
new_ns "$ns_a"
new_ns "$ns_b"
link "$ns_a" 10.77.0.1 "$ns_b" 10.77.0.2 "$id"

serve "$ns_b" bob gemma3-270m /ip4/10.77.0.2/tcp/4790
serve "$ns_a" alice smollm2-135m /ip4/10.77.0.1/tcp/4790

code=$(in_ns "$ns_b" "$work/bob" "$kith" peers invite --hours 1 2>/dev/null)
case "$code" in kith1*) ;; *) echo "no invite code: $code" >&2; exit 1 ;; esac
in_ns "$ns_a" "$work/alice" "$kith" peers accept "$code"
in_ns "$ns_a" "$work/alice" "$kith" peers list
answer=$(in_ns "$ns_a" "$work/alice" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 8 --stats "The sky is" 2>&1)
echo "$answer"
grep -q "ran on bob (through the node at" <<<"$answer" || { echo "the answer did not run on bob" >&2; exit 1; }
usage=$(in_ns "$ns_b" "$work/bob" "$kith" peers usage)
echo "$usage"
grep -q "1 requests" <<<"$usage" || { echo "bob's ledger does not show alice's request" >&2; exit 1; }

ask_bob() { # step: A's request for Gemma runs on B once they are connected again
  for _ in $(seq 1 50); do
    in_ns "$ns_a" "$work/alice" "$kith" peers list | grep -q '^bob .* connected' && break
    sleep 0.2
  done
  local again
  again=$(in_ns "$ns_a" "$work/alice" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 4 --stats "The sea is" 2>&1) || true
  echo "$again"
  grep -q "ran on bob (through the node at" <<<"$again" || { echo "bob was not reached again $1" >&2; exit 1; }
}

# B (the inviter) moves to another port, without mDNS: A only knows B's old address, but
# B saved A's (from what A said it listens on) and dials A.
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
serve "$ns_b" bob gemma3-270m /ip4/10.77.0.2/tcp/4791 KITH_NO_MDNS=1
ask_bob "after it moved (from the address it saved)"

# Both move: every saved address is stale. mDNS brings them together again.
kill "${pids[1]}" "${pids[2]}"; wait "${pids[1]}" "${pids[2]}" 2>/dev/null || true
serve "$ns_b" bob gemma3-270m /ip4/10.77.0.2/tcp/4792
serve "$ns_a" alice smollm2-135m /ip4/10.77.0.1/tcp/4793
ask_bob "after both moved (with mDNS)"
echo "netns: paired across namespaces, offloaded, reconnected from saved addresses and found again with mDNS"
