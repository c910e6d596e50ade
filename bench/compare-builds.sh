#!/usr/bin/env bash
# Builds a C project that has a Makefile honouring CC with: plain gcc, ccache (cold and
# warm), distcc to a local distccd, dcache to a local dcache-server (cold and warm), and
# the stock distcc client to that dcache-server's --listen-distcc (cold and warm), all in
# one run on this machine, and prints wall times (median of RUNS) and ratios to
# plain gcc.
#
# usage: bench/compare-builds.sh DIR [JOBS] [RUNS]
#   DIR   the project (copied; the original is not touched)
#   JOBS  make -j (default: number of cores)
#   RUNS  repetitions per configuration (default 3)
set -euo pipefail
src_dir="$(cd "${1:?usage: bench/compare-builds.sh DIR [JOBS] [RUNS]}" && pwd)"
jobs="${2:-$(nproc)}"
runs="${3:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

. "$repo/bench/lib.sh"
need_commands ccache:ccache distcc:distcc make:make
build_dcache "$repo"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cp -r "$src_dir" "$work/src"
proj="$work/src"

# One timed build after `make clean`; prints seconds.
build() {
  make -s -C "$proj" clean >/dev/null 2>&1 || true
  local t0
  t0=$(now)
  env "$@" make -s -C "$proj" -j"$jobs" >/dev/null 2>>"$work/build.log"
  elapsed "$t0" "$(now)"
}

results=()
record() { results+=("$1|$2"); printf '%-22s %8.3f s\n' "$1" "$2" >&2; }

# plain
times=(); for _ in $(seq "$runs"); do times+=("$(build CC=gcc)"); done
plain=$(printf '%s\n' "${times[@]}" | median); record "gcc" "$plain"

# ccache
export CCACHE_DIR="$work/ccache"
times=(); for _ in $(seq "$runs"); do ccache -C -z >/dev/null; times+=("$(build CC='ccache gcc')"); done
record "ccache cold" "$(printf '%s\n' "${times[@]}" | median)"
times=(); for _ in $(seq "$runs"); do times+=("$(build CC='ccache gcc')"); done
record "ccache warm" "$(printf '%s\n' "${times[@]}" | median)"

# distcc to a local distccd
dport=$(free_port)
# distccd drops root privileges, so it logs to stderr rather than into our directory.
distccd --daemon --no-detach --allow 127.0.0.1 --listen 127.0.0.1 --port "$dport" \
  --jobs "$jobs" --log-stderr 2>"$work/distccd.log" &
pids+=($!)
sleep 1
mkdir -p "$work/distcc"
times=(); for _ in $(seq "$runs"); do times+=("$(build CC='distcc gcc' DISTCC_HOSTS="127.0.0.1:$dport/$jobs" DISTCC_DIR="$work/distcc" DISTCC_FALLBACK=0)"); done
record "distcc" "$(printf '%s\n' "${times[@]}" | median)"

# dcache to a local server
dport2=$(free_port)
dport3=$(free_port)
start_server() {
  start_dcache_server "$dport2" "$work/dcache-server" "$jobs" "$work/server.log" \
    --listen-distcc "tcp://127.0.0.1:$dport3"
  pids+=("$server_pid")
}
times=()
for _ in $(seq "$runs"); do
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work/dcache-server" "$work/dcache-client"; start_server
  times+=("$(build CC="$bin/dcache gcc" DCACHE_HOSTS="tcp://127.0.0.1:$dport2" DCACHE_DIR="$work/dcache-client" DCACHE_FALLBACK=0)")
done
record "dcache server cold" "$(printf '%s\n' "${times[@]}" | median)"
times=(); for _ in $(seq "$runs"); do times+=("$(build CC="$bin/dcache gcc" DCACHE_HOSTS="tcp://127.0.0.1:$dport2" DCACHE_DIR="$work/dcache-client" DCACHE_FALLBACK=0)"); done
record "dcache server warm" "$(printf '%s\n' "${times[@]}" | median)"

# the stock distcc client to dcache-server --listen-distcc: no change on the client side
times=()
for _ in $(seq "$runs"); do
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work/dcache-server" "$work/distcc-dcache"; mkdir -p "$work/distcc-dcache"; start_server
  times+=("$(build CC='distcc gcc' DISTCC_HOSTS="127.0.0.1:$dport3/$jobs" DISTCC_DIR="$work/distcc-dcache" DISTCC_FALLBACK=0)")
done
record "distcc to dcache cold" "$(printf '%s\n' "${times[@]}" | median)"
times=(); for _ in $(seq "$runs"); do times+=("$(build CC='distcc gcc' DISTCC_HOSTS="127.0.0.1:$dport3/$jobs" DISTCC_DIR="$work/distcc-dcache" DISTCC_FALLBACK=0)"); done
record "distcc to dcache warm" "$(printf '%s\n' "${times[@]}" | median)"

# dcache embedded (no server)
times=(); for _ in $(seq "$runs"); do rm -rf "$work/dcache-local"; times+=("$(build CC="$bin/dcache gcc" DCACHE_DIR="$work/dcache-local" DCACHE_HOSTS=)"); done
record "dcache embedded cold" "$(printf '%s\n' "${times[@]}" | median)"
times=(); for _ in $(seq "$runs"); do times+=("$(build CC="$bin/dcache gcc" DCACHE_DIR="$work/dcache-local" DCACHE_HOSTS=)"); done
record "dcache embedded warm" "$(printf '%s\n' "${times[@]}" | median)"
# The same warm build without direct mode: the preprocessor runs for every file.
times=(); for _ in $(seq "$runs"); do times+=("$(build CC="$bin/dcache gcc" DCACHE_DIR="$work/dcache-local" DCACHE_HOSTS= DCACHE_DIRECT=0)"); done
record "dcache embedded warm, DCACHE_DIRECT=0" "$(printf '%s\n' "${times[@]}" | median)"

echo
echo "project: $src_dir  (make -j$jobs, median of $runs runs, $(nproc) cores)"
printf '%-38s %10s %9s\n' "build" "seconds" "vs gcc"
for r in "${results[@]}"; do
  name="${r%%|*}"; t="${r##*|}"
  printf '%-38s %10.3f %8.2fx\n' "$name" "$t" "$(ratio "$t" "$plain")"
done
