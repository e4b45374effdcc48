#!/usr/bin/env bash
# Hole punching behind two NATs. A and C sit on private networks behind NAT routers
# (iptables MASQUERADE, as a home router does); R is on the "internet" between them,
# reachable by both, and runs a Kith node that relays for its friends. Neither A nor C
# can open a connection to the other: C pairs with A through R's relay, then DCUtR
# punches a direct path through both NATs, `kith peers list` shows it as hole-punched,
# and with R gone, A's request for Gemma runs on C over it.
# Needs root (ip netns, iptables) and the pulled models.
#
#   sudo KITH_HOME=~/.local/share/kith tests/netns-nat.sh [path/to/kith]
#
# NAT_LOG=kith_mesh=debug,libp2p_dcutr=debug sets A's and C's log filter.
source "$(dirname "$0")/netns-lib.sh"
command -v iptables >/dev/null || { echo "needs iptables (Debian: apt-get install iptables)" >&2; exit 1; }

id=$$
ns_a=kith-na-$id ns_c=kith-nc-$id ns_r=kith-nr-$id nat_a=kith-nat-a-$id nat_c=kith-nat-c-$id
for ns in "$ns_a" "$ns_c" "$ns_r" "$nat_a" "$nat_c"; do new_ns "$ns"; done
# The internet: R routes between the two NAT routers' public addresses.
link "$nat_a" 10.79.1.2 "$ns_r" 10.79.1.1 "pa$id"
link "$nat_c" 10.79.2.2 "$ns_r" 10.79.2.1 "pc$id"
ip netns exec "$ns_r" sysctl -qw net.ipv4.ip_forward=1
# The private networks behind them.
link "$ns_a" 192.168.1.2 "$nat_a" 192.168.1.1 "la$id"
link "$ns_c" 192.168.2.2 "$nat_c" 192.168.2.1 "lc$id"
ip -n "$ns_a" route add default via 192.168.1.1
ip -n "$ns_c" route add default via 192.168.2.1
for side in a c; do
  nat=nat_$side
  net=$([ $side = a ] && echo 1 || echo 2)
  ip -n "${!nat}" route add default via "10.79.$net.1"
  ip netns exec "${!nat}" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "${!nat}" iptables -t nat -A POSTROUTING -o "xp$side$id" -j MASQUERADE
  # Nothing from outside reaches the private side, or the router itself, unless it
  # answers what went out; the rest is dropped silently, as home routers do.
  for chain in FORWARD INPUT; do
    ip netns exec "${!nat}" iptables -A $chain -i "xp$side$id" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip netns exec "${!nat}" iptables -A $chain -i "xp$side$id" -j DROP
  done
done
# Check the NATs: C cannot open a connection to A, neither by its private address nor
# by its router's public one.
if ip netns exec "$ns_c" timeout 2 bash -c 'exec 3<>/dev/tcp/192.168.1.2/4790' 2>/dev/null ||
  ip netns exec "$ns_c" timeout 2 bash -c 'exec 3<>/dev/tcp/10.79.1.2/4790' 2>/dev/null; then
  echo "C can open a connection to A: the test would prove nothing" >&2; exit 1
fi

listen=/ip4/0.0.0.0/tcp/4790,/ip4/0.0.0.0/udp/4790/quic-v1
serve "$ns_r" relay smollm2-135m "$listen" KITH_NO_MDNS=1
serve "$ns_a" alice smollm2-135m "$listen" KITH_NO_MDNS=1 KITH_LOG=${NAT_LOG:-kith_mesh=info}
serve "$ns_c" carol gemma3-270m "$listen" KITH_NO_MDNS=1 KITH_LOG=${NAT_LOG:-kith_mesh=info}

pair_through_relay
for _ in $(seq 1 50); do
  listed=$(peers "$ns_a" alice list)
  grep '^carol' <<<"$listed" | grep -q 'hole-punched' && break
  sleep 0.2
done
echo "$listed"
grep '^carol' <<<"$listed" | grep -q 'connected (hole-punched' || {
  grep -v 'identified a' "$work/alice/serve.log" "$work/carol/serve.log" >&2
  echo "no hole-punched path to carol" >&2; exit 1; }
# The relay goes away: the punched path does not need it.
kill "${pids[0]}"
wait "${pids[0]}" 2>/dev/null || true
answer=$(in_ns "$ns_a" "$work/alice" "$kith" ask --model gemma3-270m --temperature 0 --max-tokens 8 --stats "The sky is" 2>&1)
echo "$answer"
grep -q "ran on carol (through the node at" <<<"$answer" || { echo "the answer did not run on carol" >&2; exit 1; }
echo "netns-nat: paired through a relay, punched through two NATs, offloaded with the relay gone"
