# Shared by tests/netns*.sh (sourced): the kith binary and models, namespaces and veth
# links that are removed on exit, and `kith serve` started inside a namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
kith=${1:-target/debug/kith}
[ -x "$kith" ] || cargo build --quiet -p kith-cli
kith=$(realpath "$kith")
models=$(dirname "$(dirname "$("$kith" models path smollm2-135m)")")
"$kith" models path gemma3-270m >/dev/null

work=$(mktemp -d)
pids=()
namespaces=()
cleanup() {
  for pid in "${pids[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${namespaces[@]:-}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

new_ns() { # name
  ip netns add "$1"
  namespaces+=("$1")
  ip -n "$1" link set lo up
}

link() { # ns_x ip_x ns_y ip_y name: a veth pair between two namespaces, /24 addresses
  ip link add "x$5" type veth peer name "y$5"
  ip link set "x$5" netns "$1"
  ip link set "y$5" netns "$3"
  ip -n "$1" addr add "$2/24" dev "x$5"
  ip -n "$3" addr add "$4/24" dev "y$5"
  ip -n "$1" link set "x$5" up
  ip -n "$3" link set "y$5" up
}

in_ns() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" env KITH_HOME="$home" "$@"; }

serve() { # ns name model mesh-listen [VAR=value…]: `kith serve` in $work/name, ready on return
  local ns=$1 name=$2 model=$3 listen=$4 home="$work/$2"
  shift 4
  mkdir -p "$home"
  [ -e "$home/models" ] || ln -s "$models" "$home/models"
  [ -e "$home/vault" ] || KITH_HOME="$home" KITH_PASSPHRASE="netns $name" "$kith" vault init >/dev/null 2>&1
  # Not through in_ns: a backgrounded function is a subshell, and $! must be kith itself
  # (ip netns exec and env exec it) for the kills to reach it.
  ip netns exec "$ns" env KITH_HOME="$home" KITH_PASSPHRASE="netns $name" KITH_NODE_NAME="$name" \
    KITH_LOG=kith_mesh=info "$@" \
    "$kith" serve --model "$model" --listen 127.0.0.1:0 --mesh-listen "$listen" >"$home/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q '^Mesh: device id' "$home/serve.log" && return 0
    sleep 0.2
  done
  cat "$home/serve.log" >&2
  return 1
}

peers() { local ns=$1 name=$2; shift 2; in_ns "$ns" "$work/$name" "$kith" peers "$@"; }

# A (alice in $ns_a) and C (carol in $ns_c) pair with R (relay in $ns_r); once C holds a
# slot on R's relay, A accepts C's invite, which carries C's address through R.
pair_through_relay() {
  peers "$ns_a" alice accept "$(peers "$ns_r" relay invite 2>/dev/null)"
  peers "$ns_c" carol accept "$(peers "$ns_r" relay invite 2>/dev/null)"
  # C holds a slot on R once it has identified R as a relay.
  for _ in $(seq 1 50); do
    grep -q 'relay slot reserved' "$work/carol/serve.log" && break
    sleep 0.2
  done
  grep -q 'relay slot reserved' "$work/carol/serve.log" || { cat "$work/carol/serve.log" >&2; echo "no relay slot" >&2; exit 1; }
  peers "$ns_a" alice accept "$(peers "$ns_c" carol invite)"
}
