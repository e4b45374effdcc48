#!/usr/bin/env bash
# Kith's engine beside llama.cpp on the same machine, same files, same thread counts.
#
#   tests/benches/vs-llamacpp.sh [ROUNDS [MODEL...]]     (default 3 rounds, both models)
#
# Builds llama.cpp's llama-bench and llama-simple once (under target/llamacpp) from the
# source vendored in the llama-cpp-python sdist on PyPI (0.3.36 carries llama.cpp 0c1e570,
# the commit the fixtures were recorded with), then runs, for each catalog model and 1 and
# 2 threads, `llama-bench -p 128,512 -n 128 -r 3`, `llama-simple -n 1` and `kith bench` one
# after the other, ROUNDS times, and prints the medians and Kith ÷ llama.cpp. Peak memory:
# llama-bench's maxrss (GNU time) beside `kith bench`'s VmHWM. Load time: the `load time`
# llama-simple reports (model file to context ready) beside `kith bench`'s open + load.
# Needs curl, python3, a C++ compiler and cmake (pip-installed into the build folder when
# missing). Run it on an otherwise idle machine: alternating the programs is what makes
# their figures comparable.
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds="${1:-3}"
models=("${@:2}")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m)
work="$PWD/target/llamacpp"
version=0.3.36
bench="$work/build/bin/llama-bench"
simple="$work/build/bin/llama-simple"
mkdir -p "$work"

if [ ! -x "$bench" ] || [ ! -x "$simple" ]; then
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  if [ ! -d "$src" ]; then
    # PyPI's simple index (its JSON API is not reachable from every network), checked by hash.
    link=$(curl -fsSL "https://pypi.org/simple/llama-cpp-python/" |
      grep -o "href=\"[^\"]*/llama_cpp_python-$version.tar.gz#sha256=[0-9a-f]*" | head -n1)
    url=${link#href=\"}
    echo "downloading ${url%%#*}" >&2
    curl -fsSL "${url%%#*}" -o "$work/sdist.tar.gz"
    echo "${url##*sha256=}  $work/sdist.tar.gz" | sha256sum -c - >&2
    tar xzf "$work/sdist.tar.gz" -C "$work" && rm "$work/sdist.tar.gz"
  fi
  cmake=cmake
  if ! command -v cmake >/dev/null; then
    python3 -m pip install --quiet --target "$work/pytools" cmake
    cmake="python3 $work/pytools/bin/cmake"
    export PYTHONPATH="$work/pytools"
  fi
  # The CPU's own x86 features, but never AMX: some virtual machines advertise AMX tiles
  # without enabling them, and llama.cpp's AMX kernels then die on an illegal instruction.
  flags=(-DGGML_NATIVE=OFF)
  has() { grep -qw "$1" /proc/cpuinfo; }
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512_vnni:AVX512_VNNI \
    avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16 avx_vnni:AVXVNNI; do
    has "${pair%%:*}" && flags+=("-DGGML_${pair##*:}=ON")
  done
  $cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "${flags[@]}" >&2
  $cmake --build "$work/build" --target llama-bench llama-simple -j"$(nproc)" >&2
fi

cargo build --release --quiet -p kith-cli
kith=target/release/kith
results="$work/results.jsonl"
: >"$results"
for model in "${models[@]}"; do
  path=$("$kith" models path "$model")
  for threads in 1 2; do
    for round in $(seq "$rounds"); do
      echo "$model, $threads threads, round $round" >&2
      /usr/bin/time -f '{"maxrss_kb": %M}' -o "$work/time.json" \
        "$bench" -m "$path" -t "$threads" -p 128,512 -n 128 -r 3 -o json >"$work/llama.json" 2>/dev/null
      # Load time: llama.cpp's own figure (`load time`, model file to context ready) for a
      # one-token run, beside kith bench's open + load.
      "$simple" -m "$path" -t "$threads" -n 1 "Hello" >/dev/null 2>"$work/simple.txt"
      "$kith" -t "$threads" bench --model "$model" --json >"$work/kith.json" 2>/dev/null
      python3 - "$model" "$threads" "$work" >>"$results" <<'EOF'
import json, sys
model, threads, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llama = {}
for test in json.load(open(f"{work}/llama.json")):
    name = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}"
    llama[name] = test["avg_ts"]
llama["rss_mib"] = json.load(open(f"{work}/time.json"))["maxrss_kb"] / 1024
load = [line for line in open(f"{work}/simple.txt") if "load time" in line]
llama["load_ms"] = float(load[0].split("=")[1].split("ms")[0]) if load else float("nan")
kith = json.load(open(f"{work}/kith.json"))
print(json.dumps({"model": model, "threads": threads, "llama": llama, "kith": {
    "pp128": kith["pp128_tok_s"], "pp512": kith["pp512_tok_s"], "tg128": kith["tg128_tok_s"],
    "rss_mib": kith["peak_rss_mib"], "ttft_ratio": kith["ttft_ratio"],
    "load_ms": kith["open_ms"] + kith["load_ms"]}}))
EOF
    done
  done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| model | threads | pp128 tok/s Kith / llama.cpp | pp512 | tg128 | peak RSS MiB | load ms | turn 10 ÷ turn 1 |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted({(r["model"], r["threads"]) for r in rows}):
    group = [r for r in rows if (r["model"], r["threads"]) == key]
    med = lambda side, name: statistics.median(r[side][name] for r in group)
    cell = lambda name: f"{med('kith', name):.1f} / {med('llama', name):.1f} ({med('kith', name) / med('llama', name):.2f})"
    print(f"| {key[0]} | {key[1]} | {cell('pp128')} | {cell('pp512')} | {cell('tg128')} | "
          f"{med('kith', 'rss_mib'):.0f} / {med('llama', 'rss_mib'):.0f} | "
          f"{med('kith', 'load_ms'):.0f} / {med('llama', 'load_ms'):.0f} | {med('kith', 'ttft_ratio'):.2f} |")
print(f"\nmedians of {len(rows) // len({(r['model'], r['threads']) for r in rows})} rounds; each llama.cpp figure is llama-bench's mean of 3, each Kith figure kith bench's median of 3")
EOF
