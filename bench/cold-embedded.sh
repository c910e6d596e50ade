#!/usr/bin/env bash
# Cold builds of a C project through the embedded cache (depend mode, and with
# DCACHE_DIRECT=0 the preprocessor path) against plain gcc, interleaved run by run so a
# busy machine weighs on all three alike; prints the median of RUNS for each, wall time
# and CPU time (user + system of make and everything it ran: what a loaded machine
# distorts least), and the ratios to plain gcc. A cold build starts from an empty
# DCACHE_DIR every time. DCACHE_BIN=path skips building the release binary.
#
# usage: bench/cold-embedded.sh DIR [JOBS] [RUNS]   (DIR: e.g. from bench/fetch-lua.sh)
set -euo pipefail
src_dir="$(cd "${1:?usage: bench/cold-embedded.sh DIR [JOBS] [RUNS]}" && pwd)"
jobs="${2:-$(nproc)}"
runs="${3:-5}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
if [ -z "${DCACHE_BIN:-}" ]; then
  cargo build -q --release -p dcache-examples --bin dcache --manifest-path "$repo/Cargo.toml"
fi
dcache="${DCACHE_BIN:-$target/release/dcache}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$src_dir" "$work/src"
proj="$work/src"
# Sources a second old at least, as after a checkout (depend mode records only those).
sleep 1.1

# One build after `make clean`; prints "WALL CPU" in seconds.
build() {
  make -s -C "$proj" clean >/dev/null 2>&1 || true
  rm -rf "$work/cache"
  local TIMEFORMAT='%R %U %S' t
  t=$( { time env "$@" make -s -C "$proj" -j"$jobs" >/dev/null 2>>"$work/build.log"; } 2>&1 )
  read -r wall user sys <<<"$t"
  echo "$wall $(echo "$user + $sys" | bc -l)"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A wall cpu
names=(gcc depend direct0)
for _ in $(seq "$runs"); do
  for n in "${names[@]}"; do
    case $n in
      gcc) r=$(build CC=gcc) ;;
      depend) r=$(build CC="$dcache gcc" DCACHE_DIR="$work/cache" DCACHE_HOSTS=) ;;
      direct0) r=$(build CC="$dcache gcc" DCACHE_DIR="$work/cache" DCACHE_HOSTS= DCACHE_DIRECT=0) ;;
    esac
    wall[$n]+="${r% *} "; cpu[$n]+="${r#* } "
  done
done
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
pw=$(med "${wall[gcc]}"); pc=$(med "${cpu[gcc]}")
echo "project: $src_dir  (make -j$jobs, median of $runs interleaved runs, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
printf '%-40s %8s %7s %8s %7s\n' build "wall s" "vs gcc" "CPU s" "vs gcc"
for n in "${names[@]}"; do
  w=$(med "${wall[$n]}"); c=$(med "${cpu[$n]}")
  case $n in
    gcc) label="gcc" ;;
    depend) label="dcache embedded cold (depend mode)" ;;
    direct0) label="dcache embedded cold, DCACHE_DIRECT=0" ;;
  esac
  printf '%-40s %8.3f %6.2fx %8.3f %6.2fx\n' "$label" "$w" "$(echo "$w / $pw" | bc -l)" "$c" "$(echo "$c / $pc" | bc -l)"
done
for n in "${names[@]}"; do echo "$n wall: ${wall[$n]}| cpu: ${cpu[$n]}"; done
