#!/usr/bin/env bash
# Warm local builds with no hosts, side by side in one run, interleaved run by run so a
# busy machine weighs on all alike: dcache with its local daemon, dcache with the
# embedded server in every process (DCACHE_DAEMON=0, the behaviour before the daemon),
# and ccache. DCACHE_EXTRA="DCACHE_X=v ..." adds settings to both dcache runs. Each
# cache is filled by two builds (cold, then one that records manifests); every timed
# build is `make clean` + `make -jJOBS` against that warm cache; the daemon is left
# running between builds, as it is during a day's work. Prints the median wall time of
# RUNS for each and the ratios to ccache. DCACHE_BIN=path skips building the release
# binary.
#
# usage: bench/warm-local.sh DIR [JOBS] [RUNS]   (DIR: e.g. from bench/fetch-lua.sh)
set -euo pipefail
src_dir="$(cd "${1:?usage: bench/warm-local.sh DIR [JOBS] [RUNS]}" && pwd)"
jobs="${2:-$(nproc)}"
runs="${3:-5}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
if [ -z "${DCACHE_BIN:-}" ]; then
  cargo build -q --release -p dcache-examples --bin dcache --manifest-path "$repo/Cargo.toml"
fi
dcache="${DCACHE_BIN:-$target/release/dcache}"
command -v ccache >/dev/null || { echo "needs ccache" >&2; exit 1; }

work="$(mktemp -d)"
cleanup() { DCACHE_DIR="$work/daemon" "$dcache" --stop-daemon >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
cp -r "$src_dir" "$work/src"
proj="$work/src"
# Sources a second old at least, as after a checkout (direct mode records only those).
sleep 1.1
export CCACHE_DIR="$work/ccache"
unset DCACHE_HOSTS

# One build after `make clean`; prints the wall time in seconds.
build() {
  make -s -C "$proj" clean >/dev/null 2>&1 || true
  local TIMEFORMAT='%R' t
  t=$( { time env "$@" make -s -C "$proj" -j"$jobs" >/dev/null 2>>"$work/build.log"; } 2>&1 )
  echo "$t"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

names=(ccache daemon embedded)
declare -A env_of=(
  [ccache]="CC=ccache gcc"
  [daemon]="CC=$dcache gcc DCACHE_DIR=$work/daemon DCACHE_DAEMON=1${DCACHE_EXTRA:+ $DCACHE_EXTRA}"
  [embedded]="CC=$dcache gcc DCACHE_DIR=$work/embedded DCACHE_DAEMON=0${DCACHE_EXTRA:+ $DCACHE_EXTRA}"
)
run() { # NAME
  local IFS=$'\n'
  # shellcheck disable=SC2046
  build $(printf '%s\n' "${env_of[$1]}" | sed 's/ DCACHE_/\nDCACHE_/g')
}
# Fill every cache (cold), then once more so direct mode has its manifests.
for n in "${names[@]}"; do run "$n" >/dev/null; run "$n" >/dev/null; done
declare -A times
for _ in $(seq "$runs"); do
  for n in "${names[@]}"; do times[$n]+="$(run "$n") "; done
done
base=$(printf '%s\n' ${times[ccache]} | median)
printf '%-10s %10s %12s\n' "build" "median s" "vs ccache"
for n in "${names[@]}"; do
  m=$(printf '%s\n' ${times[$n]} | median)
  printf '%-10s %10.3f %11.2fx\n' "$n" "$m" "$(echo "$m / $base" | bc -l)"
done
echo "dcache daemon stats:" >&2
DCACHE_DIR="$work/daemon" "$dcache" --stats >&2 || true
grep -v '^$' "$work/build.log" | head -5 >&2 || true
