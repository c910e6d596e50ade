#!/usr/bin/env bash
# Builds a C project (a Makefile honouring CC) through the link emulator at each round trip
# and make -j, against a local dcache-server (cold: fresh server and client caches; warm)
# and a local distccd over the same emulated link, in one run; prints wall times (median
# of RUNS). dcache runs twice: "direct" (DCACHE_DAEMON=0: each wrapper connects to the
# server itself, a handshake per compile) and "daemon" (the wrapper's default: the relay
# daemon holds one connection to the server and a cache tier of its own). Daemon rows:
# cold (fresh server, fresh DCACHE_DIR, so a fresh daemon), warm (the same daemon again:
# served from its own tier), and "2nd client" (a fresh DCACHE_DIR and daemon against
# the warm server, as a second machine of the same team would be: no manifests yet, so
# every file is preprocessed and looked up over the daemon's connection).
#
# usage: bench/link-builds.sh DIR [RUNS] [RTTS] [JOBS] [RATE]
#   DIR   the project (copied; the original is not touched)
#   RUNS  repetitions per configuration (default 1)
#   RTTS  round trips (default "4ms 40ms")
#   JOBS  make -j values (default "2 16")
#   RATE  the link's rate each way (default 100mbit)
# DCACHE_BIN=DIR uses the dcache, dcache-server and dcache-bench already built there.
set -euo pipefail
src_dir="$(cd "${1:?usage: bench/link-builds.sh DIR [RUNS] [RTTS] [JOBS] [RATE]}" && pwd)"
runs="${2:-1}"
rtts="${3:-4ms 40ms}"
jobs_list="${4:-2 16}"
rate="${5:-100mbit}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

. "$repo/bench/lib.sh"
need_commands distcc:distcc make:make
if [ -n "${DCACHE_BIN:-}" ]; then
  bin="$DCACHE_BIN"
else
  build_dcache "$repo"
  cargo build -q --release -p dcache-bench --manifest-path "$repo/Cargo.toml"
fi

work="$(mktemp -d)"
pids=()
stop_daemons() {
  local d
  for d in "$work"/dcache-client*; do
    [ -d "$d" ] && DCACHE_DIR="$d" "$bin/dcache" --stop-daemon >/dev/null 2>&1 || true
  done
}
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; stop_daemons; stop_dcache_server; rm -rf "$work"; }
trap cleanup EXIT
cp -r "$src_dir" "$work/src"
proj="$work/src"
slots=$(nproc)

# One timed build after `make clean` with make -j$1; prints seconds.
build() {
  local j="$1"; shift
  make -s -C "$proj" clean >/dev/null 2>&1 || true
  local t0
  t0=$(now)
  env "$@" make -s -C "$proj" -j"$j" >/dev/null 2>>"$work/build.log"
  elapsed "$t0" "$(now)"
}

# Starts `dcache-bench link` to 127.0.0.1:$1 with round trip $2; sets $link_addr.
start_link() {
  local log="$work/link-$1-$2.log"
  "$bin/dcache-bench" link --listen 127.0.0.1:0 --to "127.0.0.1:$1" --rtt "$2" --rate "$rate" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    link_addr=$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$log")
    [ -n "$link_addr" ] && return 0
    sleep 0.1
  done
  echo "dcache-bench link did not start: $(cat "$log")" >&2
  return 1
}

dport=$(free_port)
distccd --daemon --no-detach --allow 127.0.0.1 --listen 127.0.0.1 --port "$dport" \
  --jobs "$slots" --log-stderr 2>"$work/distccd.log" &
pids+=($!)
sport=$(free_port)
fresh_server() {
  stop_daemons
  stop_dcache_server
  rm -rf "$work/dcache-server" "$work"/dcache-client*
  start_dcache_server "$sport" "$work/dcache-server" "$slots" "$work/server.log"
}
fresh_server
sleep 1

results=()
record() { results+=("$1|$2"); printf '%-40s %8.3f s\n' "$1" "$2" >&2; }
med() { printf '%s\n' "$@" | median; }

for rtt in $rtts; do
  start_link "$sport" "$rtt"; dlink="$link_addr"
  start_link "$dport" "$rtt"; distlink="$link_addr"
  for j in $jobs_list; do
    dc=(DCACHE_HOSTS="tcp://$dlink" DCACHE_DIR="$work/dcache-client" DCACHE_FALLBACK=0 DCACHE_DAEMON=0)
    times=(); for _ in $(seq "$runs"); do fresh_server; times+=("$(build "$j" CC="$bin/dcache gcc" "${dc[@]}")"); done
    record "rtt $rtt -j$j dcache direct cold" "$(med "${times[@]}")"
    times=(); for _ in $(seq "$runs"); do times+=("$(build "$j" CC="$bin/dcache gcc" "${dc[@]}")"); done
    record "rtt $rtt -j$j dcache direct warm" "$(med "${times[@]}")"
    dd=(DCACHE_HOSTS="tcp://$dlink" DCACHE_FALLBACK=0)
    cold=(); warm=(); second=()
    for r in $(seq "$runs"); do
      fresh_server
      cold+=("$(build "$j" CC="$bin/dcache gcc" "${dd[@]}" DCACHE_DIR="$work/dcache-client")")
      warm+=("$(build "$j" CC="$bin/dcache gcc" "${dd[@]}" DCACHE_DIR="$work/dcache-client")")
      # A second client: its daemon started by one compile of an empty file (the first
      # compiles of a fresh DCACHE_DIR go direct while the daemon starts), then the
      # build: no manifests yet, so each file is preprocessed and looked up through the
      # daemon's connection on the warm server.
      second_dir="$work/dcache-client-second-$r"
      mkdir -p "$second_dir" && : >"$second_dir/empty.c"
      env "${dd[@]}" DCACHE_DIR="$second_dir" "$bin/dcache" gcc -c "$second_dir/empty.c" -o "$second_dir/empty.o"
      sleep 1
      second+=("$(build "$j" CC="$bin/dcache gcc" "${dd[@]}" DCACHE_DIR="$second_dir")")
    done
    record "rtt $rtt -j$j dcache daemon cold" "$(med "${cold[@]}")"
    record "rtt $rtt -j$j dcache daemon warm" "$(med "${warm[@]}")"
    record "rtt $rtt -j$j dcache daemon, 2nd client" "$(med "${second[@]}")"
    mkdir -p "$work/distcc"
    times=(); for _ in $(seq "$runs"); do times+=("$(build "$j" CC='distcc gcc' DISTCC_HOSTS="$distlink/$j" DISTCC_DIR="$work/distcc" DISTCC_FALLBACK=0)"); done
    record "rtt $rtt -j$j distcc" "$(med "${times[@]}")"
  done
done

echo
echo "project: $src_dir  (median of $runs runs, $(nproc) cores, link $rate each way, server slots $slots)"
printf '%-40s %10s\n' "build" "seconds"
for r in "${results[@]}"; do
  printf '%-40s %10.3f\n' "${r%%|*}" "${r##*|}"
done
